#!/bin/sh
# The demo: what the guest sees of its CPUs and memory, its disks and a data round trip, the
# share "demo" (if there is one: the host's hello.txt, and a file back), and its entropy device.
/tests/info.sh && /tests/blk.sh || exit 1
mkdir -p /mnt/demo
if mount -t virtiofs demo /mnt/demo 2>/dev/null; then
    echo "CLOISTER-DEMO share: $(cat /mnt/demo/hello.txt)"
    echo "hello from the guest, $(uname -r)" >/mnt/demo/from-guest.txt
    umount /mnt/demo
fi
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
if [ -n "$nic" ]; then
    ip link set "$nic" up
    ip addr add 192.168.249.2/24 dev "$nic"
    i=0
    until ping -c 1 -W 1 192.168.249.1 >/dev/null 2>&1 || [ "$i" -ge 10 ]; do i=$((i + 1)); done
    echo "CLOISTER-DEMO net: $nic $(cat /sys/class/net/$nic/address), $(ping -c 3 -i 0.2 192.168.249.1 | tail -n1)"
fi
if [ -e /dev/hwrng ]; then
    echo "CLOISTER-DEMO rng: $(cat /sys/class/misc/hw_random/rng_current):" \
        "$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
fi
