# Runs inside the lab (see bench/boot, which sets $runs).
kernel=$GUEST_DIR/vmlinux
initramfs=$GUEST_DIR/initramfs.cpio
cmdline=$(guest_cmdline info)
"$BIN_DIR/boot-timer" --runs "$runs" --marker CLOISTER-GUEST-UP \
    --case qemu-microvm qemu-system-x86_64 -accel kvm -cpu host \
    -M microvm,pit=off,pic=off,rtc=on -m 512M -smp 2 -nodefaults -no-reboot -nographic \
    -serial stdio -kernel "$kernel" -initrd "$initramfs" -append "$cmdline" -- \
    --case cloister "$BIN_DIR/cloister" --kernel "$kernel" --initramfs "$initramfs" \
    --cmdline "$cmdline" --cpus boot=2 --memory size=512M --

# Start-up against memory size, on the lab's real KVM (nested paging): the host's PVM pays for
# shadow-MMU metadata per page of a memory slot, which hardware KVM with NPT/EPT does not.
payload=$("$BIN_DIR/make-payload" /tmp)
"$BIN_DIR/boot-timer" --runs $((runs * 2)) --marker CLOISTER-PAYLOAD-OK \
    --case payload-512M "$BIN_DIR/cloister" --kernel "$payload" --cpus boot=2 --memory size=512M -- \
    --case payload-16G "$BIN_DIR/cloister" --kernel "$payload" --cpus boot=2 --memory size=16G --
