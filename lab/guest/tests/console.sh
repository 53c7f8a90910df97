#!/bin/sh
# Writes a line to the virtio console's first port (/dev/hvc0), whose backend hands it to the
# host; says CLOISTER-CONSOLE hvc0=written (or missing).
i=0
while [ ! -e /dev/hvc0 ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/hvc0 ] || { echo "CLOISTER-CONSOLE hvc0=missing"; exit 1; }
echo "hello-from-hvc0" >/dev/hvc0
echo "CLOISTER-CONSOLE hvc0=written"
# Time for the backend to pass it on before the VM goes.
sleep 1
