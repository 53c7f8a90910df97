#!/usr/bin/env bash
# Installs what is needed (Debian 12, as root) and runs the whole test suite: formatting and
# lints, unit tests, host tests on /dev/kvm, and the guest tests in the lab (or directly on a
# hardware-KVM host; see CLOISTER_LAB in the README).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

start=$(date +%s)
echo "== lab: building the lab host and the test guest (cached in ${CLOISTER_CACHE:-~/.cache/cloister})"
lab/build.sh all >/dev/null
echo "== lab: ready in $(($(date +%s) - start)) s"

echo "== cargo fmt, clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
cargo build --workspace --all-targets --locked

echo "== tests"
cargo test --workspace --locked
echo "== all tests passed in $(($(date +%s) - start)) s"
