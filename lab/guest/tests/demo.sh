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
if [ -e /dev/hwrng ]; then
    echo "CLOISTER-DEMO rng: $(cat /sys/class/misc/hw_random/rng_current):" \
        "$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
fi
