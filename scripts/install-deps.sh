#!/usr/bin/env bash
# Installs, with apt-get on Debian 12 as root, everything the lab build, the demo and the test
# suite need on the host. Idempotent: a second run installs nothing.
set -euo pipefail

packages=(
    # The lab VM (L1) runs under QEMU's software emulation; QEMU 10 comes from bookworm-backports
    # because the machine's qemu-utils 10 breaks bookworm's own qemu-system-common 7.2.
    qemu-system-x86 qemu-system-common
    # Building the lab and guest images without root-only tools.
    busybox-static e2fsprogs cpio lz4 binutils kmod debootstrap
    # Tools copied into the lab and the guest.
    iproute2 fio iperf3
)

need_install=0
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need_install=1
done
if [ "$need_install" = 0 ]; then
    command -v cargo >/dev/null && exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages and not root; run as root: $0" >&2
    exit 1
fi

sources=/etc/apt/sources.list.d/debian.sources
backports=/etc/apt/sources.list.d/cloister-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(awk '/^URIs:/ {print $2; exit}' "$sources" 2>/dev/null || true)
    cat >"$backports" <<SRC
Types: deb
URIs: ${uri:-http://deb.debian.org/debian}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# -t pulls QEMU's own dependencies (qemu-system-data, seabios, ...) from backports as well.
apt-get install -y -q --no-install-recommends -t bookworm-backports "${packages[@]}"

# The Rust toolchain: rustup's (what these machines have) or, failing that, Debian's, which must
# be recent enough for the workspace's rust-version.
if ! command -v cargo >/dev/null; then
    apt-get install -y -q --no-install-recommends cargo rustc rustfmt rust-clippy || true
fi
command -v cargo >/dev/null || { echo "install-deps: no cargo; install Rust >= 1.80 (rustup)" >&2; exit 1; }
