#!/bin/sh
# Mounts the virtio-fs tag cloister.fs_tag= (default fs0) at /mnt, reads the host's file
# `from-host` (printing its sha256), writes `from-guest` with known contents, and reports
# CLOISTER-FS key=value lines.
tag=fs0
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.fs_tag=*) tag=${word#cloister.fs_tag=} ;; esac
done
mkdir -p /mnt
if ! mount -t virtiofs "$tag" /mnt; then
    echo "CLOISTER-FS mount=failed"
    exit 1
fi
echo "CLOISTER-FS mount=ok"
if [ -f /mnt/from-host ]; then
    echo "CLOISTER-FS from_host_sha256=$(sha256sum /mnt/from-host | cut -d' ' -f1)"
fi
seq 1 10000 >/mnt/from-guest
sync
echo "CLOISTER-FS from_guest_sha256=$(sha256sum /mnt/from-guest | cut -d' ' -f1)"
umount /mnt
