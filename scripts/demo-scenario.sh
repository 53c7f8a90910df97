# The demo, run inside the lab: cloister boots the stock Debian kernel (PVH entry) with the test
# guest's initramfs, 2 vCPUs, 512 MiB, a 64 MiB disk served by a vhost-user-blk process, a share
# served by virtiofsd, a NIC on a tap served by vhost-user-net and an entropy device served by
# vhost-device-rng, all started by cloister; the guest reports what it sees, writes and reads its
# disk, reads the host's file on the share and writes one back, pings the lab host through its
# NIC, reads its hardware RNG, and powers off.
echo "== $(uname -srm) in the lab; /dev/kvm from $(ls -d /sys/module/kvm_amd /sys/module/kvm_intel 2>/dev/null | xargs -n1 basename)"
truncate -s 64M "$RESULTS_DIR/disk.img"
mkdir -p "$RESULTS_DIR/share"
echo "hello from the host, $(date -u)" >"$RESULTS_DIR/share/hello.txt"
echo "== cloister --kernel vmlinux --initramfs initramfs.cpio --cpus boot=2 --memory size=512M --disk path=disk.img --fs tag=demo,path=share --net tap=demo0,ip=192.168.249.1,mask=255.255.255.0 --rng"
run demo "$BIN_DIR/cloister" \
    --kernel "$GUEST_DIR/vmlinux" \
    --initramfs "$GUEST_DIR/initramfs.cpio" \
    --cmdline "$(guest_cmdline demo)" \
    --cpus boot=2 \
    --memory size=512M \
    --disk "path=$RESULTS_DIR/disk.img" \
    --fs "tag=demo,path=$RESULTS_DIR/share" \
    --net "tap=demo0,ip=192.168.249.1,mask=255.255.255.0" \
    --rng src=/dev/urandom
echo "== the share on the host after the guest: $(cat "$RESULTS_DIR/share/from-guest.txt" 2>/dev/null)"
rm -rf "$RESULTS_DIR/disk.img" "$RESULTS_DIR/share"
