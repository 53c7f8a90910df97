#!/bin/sh
# The guest's view of its virtio-blk disks, and a data round trip on each writable one, for
# cloister's disk tests (tests/tests/blk.rs). For every disk vdX:
#   CLOISTER-BLK-vdX sectors=N ro=0|1 queues=N bus=pci|mmio serial=S
# Writable: 2 MiB of random data at MiB offsets 0, 5 and 37, written with fsync, read back
# with O_DIRECT after dropping caches (so it comes from the backend):
#   CLOISTER-BLK-DATA-vdX-OFFSET written=SHA256 read=SHA256
# Read-only: a write must fail, reads must work:
#   CLOISTER-BLK-ROWRITE-vdX rc=N      CLOISTER-BLK-READ-vdX sha256=SHA256
found=0
for sys in /sys/block/vd*; do
    [ -e "$sys" ] || continue
    found=1
    dev=${sys##*/}
    queues=$(ls "$sys/mq" | wc -l)
    case "$(readlink -f "$sys/device")" in
    *LNRO0005*) bus=mmio ;;
    *pci0000*) bus=pci ;;
    *) bus=unknown ;;
    esac
    serial=$(cat "$sys/serial" 2>/dev/null)
    ro=$(cat "$sys/ro")
    echo "CLOISTER-BLK-$dev sectors=$(cat "$sys/size") ro=$ro queues=$queues bus=$bus serial=${serial:-none}"
    if [ "$ro" = 0 ]; then
        for off in 0 5 37; do
            dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 2>/dev/null
            want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
            dd if=/tmp/pattern of="/dev/$dev" bs=1M seek="$off" conv=fsync 2>/dev/null ||
                echo "CLOISTER-BLK-ERROR write $dev at $off MiB failed"
            echo 3 >/proc/sys/vm/drop_caches
            got=$(dd if="/dev/$dev" bs=1M skip="$off" count=2 iflag=direct 2>/dev/null |
                sha256sum | cut -d' ' -f1)
            echo "CLOISTER-BLK-DATA-$dev-$off written=$want read=$got"
        done
    else
        dd if=/dev/zero of="/dev/$dev" bs=4096 count=1 conv=fsync 2>/dev/null
        echo "CLOISTER-BLK-ROWRITE-$dev rc=$?"
        got=$(dd if="/dev/$dev" bs=1M count=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        echo "CLOISTER-BLK-READ-$dev sha256=$got"
    fi
done
[ "$found" = 1 ] || echo "CLOISTER-BLK-NONE"
