#!/bin/sh
# Unbinds virtio_blk from vda and binds it again, twice: each time the driver resets the
# device and sets it up from scratch, so the VMM takes the rings back from the backend and
# hands them over again. Data written before must read back after:
#   CLOISTER-BLK-REBIND-N written=SHA256 read=SHA256
dev=$(basename "$(readlink -f /sys/block/vda/device)")
dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 2>/dev/null
want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of=/dev/vda bs=1M conv=fsync 2>/dev/null
for round in 1 2; do
    echo "$dev" >/sys/bus/virtio/drivers/virtio_blk/unbind
    [ -e /sys/block/vda ] && echo "CLOISTER-BLK-ERROR vda is still there after unbind"
    echo "$dev" >/sys/bus/virtio/drivers/virtio_blk/bind
    for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
    got=$(dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    echo "CLOISTER-BLK-REBIND-$round written=$want read=$got"
done
