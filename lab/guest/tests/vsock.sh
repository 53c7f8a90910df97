#!/bin/sh
# vsock both ways with the host (CID 2), with vsock-probe taken from the virtio-fs share
# cloister.fs_tag= (default tools): serves port 1234 for the host, says CLOISTER-VSOCK
# listening, connects to host port 5678, then waits for the host's connection.
tag=tools
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.fs_tag=*) tag=${word#cloister.fs_tag=} ;; esac
done
mkdir -p /mnt/tools
mount -t virtiofs "$tag" /mnt/tools || { echo "CLOISTER-VSOCK mount=failed"; exit 1; }
probe=/mnt/tools/vsock-probe
"$probe" guest-serve 1234 >/tmp/serve.out 2>&1 &
server=$!
i=0
while ! grep -q listening /tmp/serve.out && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "CLOISTER-VSOCK listening"
reply=$("$probe" guest-connect 2 5678 from-guest 2>&1)
echo "CLOISTER-VSOCK guest_connect=$(echo "$reply" | sed -n 's/^guest-connect: //p')"
wait "$server"
src=$?
echo "CLOISTER-VSOCK guest_serve=$(sed -n 's/^guest-serve: got //p' /tmp/serve.out) serve_rc=$src"
[ "$src" = 0 ] || sed 's/^/CLOISTER-VSOCK serve-log: /' /tmp/serve.out
umount /mnt/tools
