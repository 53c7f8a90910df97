# The demo, run inside the lab: cloister boots the stock Debian kernel (PVH entry) with the test
# guest's initramfs, 2 vCPUs, 512 MiB and a 64 MiB disk served by a vhost-user-blk process that
# cloister spawns; the guest reports what it sees, writes and reads its disk, and powers off.
echo "== $(uname -srm) in the lab; /dev/kvm from $(ls -d /sys/module/kvm_amd /sys/module/kvm_intel 2>/dev/null | xargs -n1 basename)"
truncate -s 64M "$RESULTS_DIR/disk.img"
echo "== cloister --kernel vmlinux --initramfs initramfs.cpio --cpus boot=2 --memory size=512M --disk path=disk.img"
run demo "$BIN_DIR/cloister" \
    --kernel "$GUEST_DIR/vmlinux" \
    --initramfs "$GUEST_DIR/initramfs.cpio" \
    --cmdline "$(guest_cmdline demo)" \
    --cpus boot=2 \
    --memory size=512M \
    --disk "path=$RESULTS_DIR/disk.img"
rm -f "$RESULTS_DIR/disk.img"
