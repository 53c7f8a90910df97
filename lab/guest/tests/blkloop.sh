#!/bin/sh
# Reads /dev/vda over and over (O_DIRECT, so every pass reaches the backend) until the VM is
# stopped: the load under which a test kills the disk's backend.
echo "CLOISTER-BLK-LOOP started"
pass=0
while :; do
    dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null
    pass=$((pass + 1))
    echo "CLOISTER-BLK-LOOP pass=$pass"
done
