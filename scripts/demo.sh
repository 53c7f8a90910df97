#!/usr/bin/env bash
# Installs what is needed (Debian 12, as root), builds Cloister, and boots the test guest with
# `cloister` inside the lab (or directly on a hardware-KVM host), showing the guest's console.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/lab --timeout 300 scripts/demo-scenario.sh demo
