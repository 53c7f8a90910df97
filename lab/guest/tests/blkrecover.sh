#!/bin/sh
# Writes every 4 KiB block of the first cloister.size (default 32M) of /dev/vda once, in random order, each carrying its offset
# and a CRC32C of its contents (fio's verify header), with O_DIRECT at queue depth cloister.qd
# (default 16), a flush every 64 writes and at most cloister.iops writes a second (so that a
# test has time to kill the disk's backend several times meanwhile); then reads every block
# back and checks it. Any I/O error or bad block fails it. Needs initramfs-tools.cpio.
qd=16
iops=800
size=32M
for word in $(cat /proc/cmdline); do
    case "$word" in
    cloister.qd=*) qd=${word#cloister.qd=} ;;
    cloister.iops=*) iops=${word#cloister.iops=} ;;
    cloister.size=*) size=${word#cloister.size=} ;;
    esac
done
if ! command -v fio >/dev/null; then
    echo "CLOISTER-BLK-RECOVER fio=missing (boot with initramfs-tools.cpio)"
    exit 1
fi
echo "CLOISTER-BLK-RECOVER writing qd=$qd iops=$iops size=$size"
fio --name=recover --filename=/dev/vda --rw=randwrite --bs=4k --size="$size" --direct=1 \
    --ioengine=libaio --iodepth="$qd" --fsync=64 --rate_iops="$iops" --verify=crc32c \
    --do_verify=1 --verify_fatal=1 >/tmp/fio.out 2>&1
rc=$?
errors=$(dmesg | grep -c "I/O error")
echo "CLOISTER-BLK-RECOVER done rc=$rc io_errors=$errors"
[ "$rc" = 0 ] || cat /tmp/fio.out
[ "$rc" = 0 ] && [ "$errors" = 0 ]
