# The demo, run inside the lab: cloister boots the stock Debian kernel (PVH entry) with the test
# guest's initramfs, 2 vCPUs and 512 MiB; the guest reports what it sees and powers off.
echo "== $(uname -srm) in the lab; /dev/kvm from $(ls -d /sys/module/kvm_amd /sys/module/kvm_intel 2>/dev/null | xargs -n1 basename)"
echo "== cloister --kernel vmlinux --initramfs initramfs.cpio --cpus boot=2 --memory size=512M"
run demo "$BIN_DIR/cloister" \
    --kernel "$GUEST_DIR/vmlinux" \
    --initramfs "$GUEST_DIR/initramfs.cpio" \
    --cmdline "$(guest_cmdline info)" \
    --cpus boot=2 \
    --memory size=512M
