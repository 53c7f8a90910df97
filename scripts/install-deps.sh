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
    # DPDK's testpmd, a third-party vhost-user frontend and backend for the network tests.
    dpdk-dev
    # What the Rust virtiofsd builds against (cargo install, below).
    libcap-ng-dev libseccomp-dev pkg-config
)

# Third-party vhost-user backends from crates.io, at the versions the tests were written
# against: the Rust virtiofsd (managed --fs) and rust-vmm's rng, vsock and console backends.
cargo_tools=(virtiofsd@1.14.0 vhost-device-rng@0.1.0 vhost-device-vsock@0.3.0
    vhost-device-console@0.1.0)

install_cargo_tools() {
    local tool name
    for tool in "${cargo_tools[@]}"; do
        name=${tool%@*}
        if ! command -v "$name" >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/$name" ]; then
            echo "install-deps: cargo install $tool"
            cargo install --locked --quiet "$tool"
        fi
    done
}

need_install=0
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need_install=1
done
if [ "$need_install" = 0 ] && command -v cargo >/dev/null; then
    install_cargo_tools
    exit 0
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
install_cargo_tools
