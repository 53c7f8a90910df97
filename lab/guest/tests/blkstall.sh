#!/bin/sh
# One 4 KiB O_DIRECT read at a time from /dev/vda, for cloister.secs seconds (default 60), each
# one's completion latency logged; then prints every latency over 20 ms, which is how long the
# read in flight when a test killed the disk's backend waited for the next one to finish it.
# Needs initramfs-tools.cpio.
secs=60
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.secs=*) secs=${word#cloister.secs=} ;; esac
done
if ! command -v fio >/dev/null; then
    echo "CLOISTER-STALL fio=missing (boot with initramfs-tools.cpio)"
    exit 1
fi
echo "CLOISTER-STALL start"
fio --name=stall --filename=/dev/vda --rw=randread --bs=4k --direct=1 --ioengine=psync \
    --runtime="$secs" --time_based --write_lat_log=/tmp/stall --log_avg_msec=0 \
    --output=/tmp/fio.out || { cat /tmp/fio.out; exit 1; }
# Columns: time (ms), latency (ns), direction, block size, offset.
awk -F, '$2 > 20000000 { printf "CLOISTER-STALL ms=%d\n", $2 / 1000000 }' /tmp/stall_clat.1.log
echo "CLOISTER-STALL done ios=$(wc -l </tmp/stall_clat.1.log)"
