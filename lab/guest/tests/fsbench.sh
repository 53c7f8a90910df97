#!/bin/sh
# The virtio-fs benchmark's guest side (bench/fs): mounts the tag cloister.fs_tag= (default
# bench) and runs fio on it, then a metadata job. Needs initramfs-tools.cpio. One line each:
# CLOISTER-FSBENCH job=NAME iops=N kib=N (kib for the data jobs, iops = operations a second).
# cloister.fsbench_secs= sets each fio job's time (default 5), cloister.fsbench_files= the
# metadata job's file count (default 500).
tag=bench
secs=5
files=500
for word in $(cat /proc/cmdline); do
    case "$word" in
    cloister.fs_tag=*) tag=${word#cloister.fs_tag=} ;;
    cloister.fsbench_secs=*) secs=${word#cloister.fsbench_secs=} ;;
    cloister.fsbench_files=*) files=${word#cloister.fsbench_files=} ;;
    esac
done
command -v fio >/dev/null || { echo "CLOISTER-FSBENCH fio=missing"; exit 1; }
mkdir -p /mnt/bench
mount -t virtiofs "$tag" /mnt/bench || { echo "CLOISTER-FSBENCH mount=failed"; exit 1; }
d=/mnt/bench
# fio NAME RW BS: psync (FUSE requests are synchronous per thread) on a 256 MiB file.
job() {
    out=$(fio --name="$1" --filename="$d/fio.dat" --size=256M --rw="$2" --bs="$3" \
        --ioengine=psync --runtime="$secs" --time_based --output-format=terse \
        --terse-version=3 2>&1) || { echo "$out"; return 1; }
    echo "$out" | awk -F';' -v job="$1" -v rw="$2" '{
        if (rw ~ /read/) printf "CLOISTER-FSBENCH job=%s iops=%s kib=%s\n", job, $8, $7
        else printf "CLOISTER-FSBENCH job=%s iops=%s kib=%s\n", job, $49, $48 }'
}
# Lay the file out first, so the read jobs read data.
fio --name=layout --filename="$d/fio.dat" --size=256M --rw=write --bs=1M --ioengine=psync \
    >/dev/null 2>&1
job seqwrite-1m write 1M || exit 1
job seqread-1m read 1M || exit 1
job randread-4k randread 4k || exit 1
rm -f "$d/fio.dat"
# Metadata: create, stat and delete $files small files; operations a second from the uptime.
centis() { awk '{ printf "%d\n", $1 * 100 }' /proc/uptime; }
mkdir -p "$d/meta"
start=$(centis)
i=0
while [ "$i" -lt "$files" ]; do echo x >"$d/meta/f$i"; i=$((i + 1)); done
i=0
while [ "$i" -lt "$files" ]; do stat "$d/meta/f$i" >/dev/null; i=$((i + 1)); done
rm -f "$d"/meta/f*
end=$(centis)
elapsed=$((end - start))
[ "$elapsed" -gt 0 ] || elapsed=1
echo "CLOISTER-FSBENCH job=metadata iops=$((3 * files * 100 / elapsed)) kib=0"
rmdir "$d/meta"
umount "$d"
