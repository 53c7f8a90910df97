#!/bin/sh
# Uses the virtio-fs share cloister.fs_tag= (default rw) in a loop for up to two minutes,
# saying CLOISTER-FSLOOP pass=N each time round, for tests that take its daemon away.
tag=rw
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.fs_tag=*) tag=${word#cloister.fs_tag=} ;; esac
done
mkdir -p /mnt/share
mount -t virtiofs "$tag" /mnt/share || { echo "CLOISTER-FSLOOP mount=failed"; exit 1; }
pass=0
while [ "$pass" -lt 600 ]; do
    pass=$((pass + 1))
    cat /mnt/share/from-host >/dev/null
    echo "$pass" >/mnt/share/loop
    echo "CLOISTER-FSLOOP pass=$pass"
    sleep 0.2
done
