#!/bin/sh
# Runs fio against a block device: cloister.fio=SPEC[+SPEC...], each SPEC being
# RW,BS,IODEPTH,SECONDS[,DEVICE] (default randread,4k,32,5,/dev/vda), O_DIRECT with libaio, one
# after the other. Needs initramfs-tools.cpio. Reports a CLOISTER-FIO line per SPEC.
specs=randread,4k,32,5,/dev/vda
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.fio=*) specs=${word#cloister.fio=} ;; esac
done
if ! command -v fio >/dev/null; then
    echo "CLOISTER-FIO fio=missing (boot with initramfs-tools.cpio)"
    exit 1
fi
for spec in $(echo "$specs" | tr '+' ' '); do
    IFS=, read -r rw bs depth secs dev <<EOS
$spec
EOS
    dev=${dev:-/dev/vda}
    # Terse output v3: field 8 is read IOPS, 7 read KiB/s; 49 write IOPS, 48 write KiB/s.
    out=$(fio --name=job --filename="$dev" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --ioengine=libaio --direct=1 --runtime="$secs" --time_based --output-format=terse \
        --terse-version=3 2>&1) || { echo "$out"; exit 1; }
    echo "$out" | awk -F';' -v rw="$rw" -v bs="$bs" -v qd="$depth" '{
        printf "CLOISTER-FIO rw=%s bs=%s qd=%s read_iops=%s read_kib=%s write_iops=%s write_kib=%s\n",
            rw, bs, qd, $8, $7, $49, $48 }'
done
