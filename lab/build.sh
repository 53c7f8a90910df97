#!/usr/bin/env bash
# Builds the lab host image (L1) and the test guest (L2) from Debian's packages, or finds them in
# the cache. Everything is keyed on its inputs (package versions and the files in lab/), so a warm
# run does nothing but hash. Prints KEY=PATH lines on stdout for the harness; logs go to stderr.
#
# Usage: lab/build.sh [lab|guest|rootfs|all]...   (default: lab guest)
#
# L1 = Debian's cloud kernel + a stage-1 initramfs that mounts an ext4 root holding busybox, the
#      kvm modules, iproute2, fio, iperf3 and QEMU (binaries and their libraries copied from the
#      host's Debian packages, which scripts/install-deps.sh installs).
# L2 = the same kernel as bzImage and as a PVH vmlinux extracted from it, and a busybox initramfs
#      whose /init runs the test named by cloister.test= on the kernel command line.
# rootfs = a Debian 12 root filesystem (debootstrap minbase + systemd) as an ext4 image.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${CLOISTER_CACHE:-$HOME/.cache/cloister}
mkdir -p "$cache"
log() { echo "lab/build: $*" >&2; }

# One builder at a time: tests running in parallel all call this script.
exec 9>"$cache/build.lock"
flock 9

hash_of() { sha256sum | cut -c1-16; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }

# ---------------------------------------------------------------------------------------------
# The kernel: one Debian package feeds both L1 and L2.
kernel_package() {
    local pkg
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
    if [ -z "$pkg" ]; then
        # No package lists yet, or offline: use the newest kernel already in the cache.
        pkg=$(ls -d "$cache"/kernel-* 2>/dev/null | sort -V | tail -n1 | sed 's|.*/kernel-||; s|_.*||')
    fi
    [ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64 (run apt-get update)"; exit 1; }
    echo "$pkg"
}

build_kernel() {
    local pkg ver dir tmp
    pkg=$(kernel_package)
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
        dir=$(ls -d "$cache/kernel-${pkg}"_* 2>/dev/null | sort -V | tail -n1)
    else
        dir="$cache/kernel-${pkg}_${ver}"
    fi
    if [ ! -f "$dir/done" ]; then
        log "fetching $pkg $ver"
        tmp=$(mktemp -d "$cache/tmp.XXXXXX")
        (cd "$tmp" && apt-get download -q "$pkg" >&2 2>/dev/null) ||
            (cd "$tmp" && chmod 777 . && apt-get download -q "$pkg" >&2)
        dpkg-deb -x "$tmp"/*.deb "$tmp/x"
        mkdir -p "$tmp/out"
        cp "$tmp"/x/boot/vmlinuz-* "$tmp/out/bzImage"
        cp "$tmp"/x/boot/config-* "$tmp/out/config"
        mkdir -p "$tmp/out/modules"
        mv "$tmp"/x/lib/modules/* "$tmp/out/modules/"
        extract_vmlinux "$tmp/out/bzImage" "$tmp/out/vmlinux"
        rm -rf "$dir"
        mv "$tmp/out" "$dir"
        rm -rf "$tmp"
        touch "$dir/done"
    fi
    KERNEL_DIR=$dir
    KERNEL_RELEASE=$(ls "$dir/modules")
}

# The bzImage's setup header says where its compressed payload is (payload_offset at 0x248,
# payload_length at 0x24c, after (setup_sects + 1) * 512 bytes of real-mode setup).
extract_vmlinux() {
    local bz=$1 out=$2 setup_sects off len
    setup_sects=$(od -An -tu1 -j 0x1f1 -N1 "$bz" | tr -d ' ')
    off=$(od -An -tu4 -j 0x248 -N4 "$bz" | tr -d ' ')
    len=$(od -An -tu4 -j 0x24c -N4 "$bz" | tr -d ' ')
    off=$(((setup_sects + 1) * 512 + off))
    # lz4 exits 1 on the size trailer the kernel appends even when the output is complete;
    # readelf below is the real check.
    tail -c +$((off + 1)) "$bz" | head -c "$len" | lz4 -dc >"$out" 2>/dev/null || true
    if ! readelf -n "$out" 2>/dev/null | grep -q 'Xen'; then
        log "could not extract a PVH vmlinux from $bz (payload not LZ4, or no Xen PVH note)"
        exit 1
    fi
}

# QEMU 8+ no longer ships the C virtiofsd; bookworm's own qemu-system-common 7.2 has it at
# /usr/lib/qemu/virtiofsd. Taken from that package (downloaded, unpacked, never installed).
build_c_virtiofsd() {
    local ver dir tmp
    ver=$(apt-cache madison qemu-system-common 2>/dev/null |
        awk -F'|' '$3 ~ /bookworm\/main/ && $3 !~ /backports/ {gsub(/ /, "", $2); print $2; exit}')
    if [ -z "$ver" ]; then
        dir=$(ls -d "$cache"/virtiofsd-c-* 2>/dev/null | sort -V | tail -n1)
    else
        dir="$cache/virtiofsd-c-${ver//:/_}"
    fi
    [ -n "$dir" ] || { log "cannot find bookworm's qemu-system-common (run apt-get update)"; exit 1; }
    if [ ! -f "$dir/done" ]; then
        log "fetching the C virtiofsd from qemu-system-common $ver"
        tmp=$(mktemp -d "$cache/tmp.XXXXXX")
        chmod 777 "$tmp"
        (cd "$tmp" && apt-get download -q "qemu-system-common=$ver" >&2)
        dpkg-deb -x "$tmp"/*.deb "$tmp/x"
        mkdir -p "$dir"
        install -m 0755 "$tmp/x/usr/lib/qemu/virtiofsd" "$dir/virtiofsd"
        rm -rf "$tmp"
        touch "$dir/done"
    fi
    C_VIRTIOFSD=$dir/virtiofsd
}

# ---------------------------------------------------------------------------------------------
# Helpers to assemble root trees.

# Copies the shared libraries an executable needs (its ldd closure) into a root tree.
copy_libs_of() {
    local root=$1 f=$2 lib
    ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^[[:space:]]*\/lib/ {print $1}' |
        while read -r lib; do
            [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
        done
}

# Copies executables, at the same paths, and their shared libraries into a root tree.
copy_with_libs() {
    local root=$1 f
    shift
    for f in "$@"; do
        install -D -m 0755 "$f" "$root$f"
        copy_libs_of "$root" "$f"
    done
}

# Copies the named modules and everything they depend on, then writes modules.dep for modprobe.
copy_modules() {
    local root=$1 moddir=$2 release=$3
    shift 3
    local queue=("$@") seen=" " m path deps
    while [ ${#queue[@]} -gt 0 ]; do
        m=${queue[0]}
        queue=("${queue[@]:1}")
        case "$seen" in *" $m "*) continue ;; esac
        seen="$seen$m "
        path=$(find "$moddir/kernel" -name "$m.ko" -o -name "${m//_/-}.ko" | head -n1)
        if [ -z "$path" ]; then
            grep -q "/$m.ko$\|/${m//_/-}.ko$" "$moddir/modules.builtin" ||
                log "warning: module $m not found"
            continue
        fi
        install -D -m 0644 "$path" "$root/lib/modules/$release/${path#"$moddir"/}"
        deps=$(modinfo -F depends "$path" | tr ',' ' ')
        for d in $deps; do queue+=("$d"); done
    done
    cp "$moddir"/modules.builtin* "$moddir/modules.order" "$root/lib/modules/$release/"
    depmod -b "$root" "$release"
}

busybox_root() {
    local root=$1 applet
    install -D -m 0755 /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    mkdir -p "$root"/{dev,proc,sys,tmp,run,mnt,etc,root,sbin,usr/bin,usr/sbin,var/tmp}
    ln -sf /proc/self/mounts "$root/etc/mtab"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
}

make_cpio() { (cd "$1" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) >"$2"; }

# An ext4 image of a directory, sized to its content plus headroom; built without root.
make_ext4() {
    local dir=$1 img=$2 label=$3 extra_mb=${4:-64} kb
    kb=$(du -sk "$dir" | cut -f1)
    rm -f "$img"
    truncate -s $(((kb * 12 / 10 + extra_mb * 1024) * 1024)) "$img"
    mkfs.ext4 -q -F -L "$label" -E root_owner=0:0 -d "$dir" "$img"
}

# ---------------------------------------------------------------------------------------------
# L1: the lab host.
lab_tools=(
    /usr/bin/qemu-system-x86_64 /usr/bin/qemu-storage-daemon /usr/bin/qemu-img
    /usr/bin/fio /usr/bin/iperf3 /usr/sbin/ip /usr/sbin/bridge /usr/sbin/debugfs
)
lab_modules=(irqbypass kvm kvm_amd kvm_intel tun bridge veth vhost_net vhost_vsock
    virtio_pci virtio_blk virtio_net virtio_console ext4 fuse virtiofs)
# Third-party vhost-user backends cloister starts or tests against, from crates.io
# (scripts/install-deps.sh installs them with cargo); in the lab they go to /usr/bin.
cargo_backends=(virtiofsd vhost-device-rng vhost-device-vsock vhost-device-console)

# The installed path of a cargo-installed backend.
cargo_backend() {
    command -v "$1" 2>/dev/null || echo "${CARGO_HOME:-$HOME/.cargo}/bin/$1"
}

build_lab() {
    local key dir tmp root stage1 f
    build_c_virtiofsd
    for f in "${cargo_backends[@]}"; do
        [ -x "$(cargo_backend "$f")" ] || { log "$f is missing: run scripts/install-deps.sh"; exit 1; }
    done
    key=$( {
        echo "$C_VIRTIOFSD"
        for f in "${cargo_backends[@]}"; do sha256sum "$(cargo_backend "$f")"; done
        cat "$here/build.sh" "$here"/l1/*
        echo "$KERNEL_DIR"
        for f in qemu-system-x86 qemu-system-common qemu-system-data seabios fio iperf3 iproute2 \
            busybox-static e2fsprogs libc6; do echo "$f $(pkg_version "$f")"; done
    } | hash_of)
    dir="$cache/lab-$key"
    if [ ! -f "$dir/done" ]; then
        log "building the lab image (L1) in $dir"
        tmp=$(mktemp -d "$cache/tmp.XXXXXX")
        root=$tmp/root
        busybox_root "$root"
        copy_with_libs "$root" "${lab_tools[@]}"
        # Debian's busybox shell runs its own applets before anything on PATH (so `ip` would
        # be busybox's, without `tuntap`); scenarios get dash as /bin/sh, as on a Debian host.
        copy_with_libs "$root" /usr/bin/dash
        ln -sf /usr/bin/dash "$root/bin/sh"
        ln -sfn /run "$root/var/run"
        install -D -m 0755 "$C_VIRTIOFSD" "$root/usr/lib/qemu/virtiofsd"
        copy_libs_of "$root" "$C_VIRTIOFSD"
        for f in "${cargo_backends[@]}"; do
            install -D -m 0755 "$(cargo_backend "$f")" "$root/usr/bin/$f"
            copy_libs_of "$root" "$(cargo_backend "$f")"
        done
        # QEMU's firmware for the machine types the tests use (q35/pc via SeaBIOS, microvm).
        # Debian's QEMU looks for firmware in /usr/share/qemu, then /usr/share/seabios.
        mkdir -p "$root/usr/share/qemu" "$root/usr/share/seabios"
        for f in bios-256k.bin bios.bin bios-microvm.bin qboot.rom pvh.bin linuxboot.bin \
            linuxboot_dma.bin multiboot.bin multiboot_dma.bin kvmvapic.bin efi-virtio.rom; do
            for d in /usr/share/qemu /usr/share/seabios; do
                if [ -e "$d/$f" ]; then cp -L "$d/$f" "$root$d/"; fi
            done
        done
        copy_modules "$root" "$KERNEL_DIR/modules/$KERNEL_RELEASE" "$KERNEL_RELEASE" "${lab_modules[@]}"
        install -m 0755 "$here/l1/lab-init" "$root/sbin/lab-init"
        mkdir -p "$root/guest" "$root/payload"
        mkdir -p "$dir.new"
        make_ext4 "$root" "$dir.new/root.ext4" cloister-lab 256

        stage1=$tmp/stage1
        busybox_root "$stage1"
        copy_modules "$stage1" "$KERNEL_DIR/modules/$KERNEL_RELEASE" "$KERNEL_RELEASE" \
            virtio_pci virtio_blk
        mkdir -p "$stage1/newroot"
        install -m 0755 "$here/l1/init-stage1" "$stage1/init"
        make_cpio "$stage1" "$dir.new/initrd.cpio"
        cp "$KERNEL_DIR/bzImage" "$dir.new/bzImage"
        rm -rf "$dir" "$tmp"
        mv "$dir.new" "$dir"
        touch "$dir/done"
    fi
    LAB_DIR=$dir
}

# ---------------------------------------------------------------------------------------------
# L2: the test guest.
guest_modules=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtiofs fuse
    pvpanic_mmio ext4 virtio-rng vmw_vsock_virtio_transport button evdev)

build_guest() {
    local key dir tmp root
    key=$( {
        cat "$here/build.sh" "$here"/guest/init "$here"/guest/tests/*
        echo "$KERNEL_DIR"
        for f in fio iperf3 busybox-static libc6 e2fsprogs; do echo "$f $(pkg_version "$f")"; done
    } | hash_of)
    dir="$cache/guest-$key"
    if [ ! -f "$dir/done" ]; then
        log "building the test guest (L2) in $dir"
        tmp=$(mktemp -d "$cache/tmp.XXXXXX")
        root=$tmp/root
        busybox_root "$root"
        copy_modules "$root" "$KERNEL_DIR/modules/$KERNEL_RELEASE" "$KERNEL_RELEASE" "${guest_modules[@]}"
        install -m 0755 "$here/guest/init" "$root/init"
        mkdir -p "$root/tests"
        install -m 0755 "$here"/guest/tests/*.sh "$root/tests/"
        mkdir -p "$tmp/out"
        make_cpio "$root" "$tmp/out/initramfs.cpio"
        # fio drags in ~75 MB of libraries (ceph, icu): they go in a second archive, appended
        # (the kernel unpacks concatenated cpio archives in turn) only for tests that need them.
        copy_with_libs "$tmp/tools" /usr/bin/fio /usr/bin/iperf3
        make_cpio "$tmp/tools" "$tmp/tools.cpio"
        cat "$tmp/out/initramfs.cpio" "$tmp/tools.cpio" >"$tmp/out/initramfs-tools.cpio"
        cp "$KERNEL_DIR/bzImage" "$KERNEL_DIR/vmlinux" "$tmp/out/"
        # The guest files reach L1 as one read-only disk.
        make_ext4 "$tmp/out" "$tmp/guest.ext4" cloister-guest 16
        mv "$tmp/guest.ext4" "$tmp/out/guest.ext4"
        rm -rf "$dir"
        mv "$tmp/out" "$dir"
        rm -rf "$tmp"
        touch "$dir/done"
    fi
    GUEST_DIR=$dir
}

# ---------------------------------------------------------------------------------------------
# A Debian 12 root filesystem for "boots a real distribution" tests.
build_rootfs() {
    local key dir tmp mirror
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    key=$( {
        cat "$here/build.sh"
        echo "$mirror"
        echo "$KERNEL_DIR"
        pkg_version debootstrap
    } | hash_of)
    dir="$cache/rootfs-$key"
    if [ ! -f "$dir/done" ]; then
        log "building the Debian 12 root filesystem in $dir (debootstrap; a few minutes)"
        tmp=$(mktemp -d "$cache/tmp.XXXXXX")
        debootstrap --variant=minbase --include=systemd-sysv,udev,iproute2,kmod \
            bookworm "$tmp/root" "$mirror" >&2
        # The guest kernel's modules, so udev can load virtio drivers by alias.
        mkdir -p "$tmp/root/lib/modules"
        cp -a "$KERNEL_DIR/modules/$KERNEL_RELEASE" "$tmp/root/lib/modules/"
        depmod -b "$tmp/root" "$KERNEL_RELEASE"
        echo "cloister-guest" >"$tmp/root/etc/hostname"
        echo "/dev/vda / ext4 defaults 0 1" >"$tmp/root/etc/fstab"
        chroot "$tmp/root" passwd -d root >/dev/null
        # Serial console login without a password, so the demo gets a shell.
        mkdir -p "$tmp/root/etc/systemd/system/serial-getty@ttyS0.service.d"
        cat >"$tmp/root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
UNIT
        # Tells the console (and so the tests) that multi-user.target was reached; powers off
        # when the command line asks, so a test run ends by itself. Through the kernel's log
        # (level 2, shown even with `quiet`), not the tty: agetty, starting on the same serial
        # line at the same moment, hangs the tty up and took the line with it now and then.
        cat >"$tmp/root/etc/systemd/system/cloister-ready.service" <<'UNIT'
[Unit]
Description=Report reaching multi-user.target on the console
After=multi-user.target

[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo "<2>CLOISTER-DEBIAN-UP $(systemctl is-system-running)" >/dev/kmsg; if grep -qw cloister.poweroff /proc/cmdline; then systemctl --no-block poweroff; fi'

[Install]
WantedBy=multi-user.target
UNIT
        mkdir -p "$tmp/root/etc/systemd/system/multi-user.target.wants"
        ln -s /etc/systemd/system/cloister-ready.service \
            "$tmp/root/etc/systemd/system/multi-user.target.wants/cloister-ready.service"
        rm -rf "$tmp/root/var/cache/apt/archives"/*.deb "$tmp/root/var/lib/apt/lists"/*
        mkdir -p "$tmp/out"
        make_ext4 "$tmp/root" "$tmp/out/debian.ext4" cloister-root 256
        rm -rf "$dir"
        mv "$tmp/out" "$dir"
        rm -rf "$tmp"
        touch "$dir/done"
    fi
    ROOTFS_DIR=$dir
}

# ---------------------------------------------------------------------------------------------
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(lab guest)
build_kernel
echo "KERNEL_DIR=$KERNEL_DIR"
# (No `f && g` here: errexit does not apply inside a function called on the left of &&.)
for t in "${targets[@]}"; do
    case "$t" in
    lab | guest | rootfs) ;;
    all) targets=(lab guest rootfs) ;;
    *) log "unknown target '$t' (lab, guest, rootfs, all)"; exit 2 ;;
    esac
done
for t in "${targets[@]}"; do
    case "$t" in
    lab)
        build_lab
        echo "LAB_DIR=$LAB_DIR"
        ;;
    guest)
        build_guest
        echo "GUEST_DIR=$GUEST_DIR"
        ;;
    rootfs)
        build_rootfs
        echo "ROOTFS_DIR=$ROOTFS_DIR"
        ;;
    esac
done
# Leftovers of interrupted builds.
find "$cache" -maxdepth 1 -name 'tmp.*' -mmin +120 -exec rm -rf {} + 2>/dev/null || true
