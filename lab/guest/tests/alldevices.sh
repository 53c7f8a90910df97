#!/bin/sh
# A disk, a share, an entropy device and a vsock device in one VM: each answers. The share
# (cloister.fs_tag=, default tools) brings vsock-probe; the host serves vsock port 5678.
tag=tools
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.fs_tag=*) tag=${word#cloister.fs_tag=} ;; esac
done
rc=0
dd if=/dev/urandom of=/tmp/block bs=1M count=1 2>/dev/null
dd if=/tmp/block of=/dev/vda bs=1M count=1 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
if [ "$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum)" = "$(sha256sum </tmp/block)" ]; then
    echo "CLOISTER-ALL disk=ok"
else
    echo "CLOISTER-ALL disk=bad"; rc=1
fi
/tests/rng.sh || rc=1
mkdir -p /mnt/tools
if mount -t virtiofs "$tag" /mnt/tools; then
    echo "CLOISTER-ALL share=$(sha256sum </mnt/tools/from-host | cut -d' ' -f1)"
    reply=$(/mnt/tools/vsock-probe guest-connect 2 5678 from-guest 2>&1)
    echo "CLOISTER-ALL vsock=$(echo "$reply" | sed -n 's/^guest-connect: //p')"
    umount /mnt/tools
else
    echo "CLOISTER-ALL share=failed"; rc=1
fi
exit $rc
