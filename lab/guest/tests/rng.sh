#!/bin/sh
# The virtio entropy device: which hardware RNG the kernel uses, and what /dev/hwrng yields.
current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)
a=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
b=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
echo "CLOISTER-RNG current=$current bytes=$bytes a=$a b=$b"
case "$current" in virtio_rng*) ;; *) exit 1 ;; esac
[ "$bytes" = 64 ] && [ "$a" != "$b" ]
