#!/bin/sh
# 256 MiB written to and read back from /dev/vda with O_DIRECT between two markers; the
# scenario samples the VMM's CPU time at each marker.
echo "CLOISTER-BLK-PERF-START"
sleep 1
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/dev/vda bs=64k count=4096 oflag=direct 2>/dev/null
dd if=/dev/vda of=/dev/null bs=64k count=4096 iflag=direct 2>/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
echo "CLOISTER-BLK-PERF-END start=$start end=$end"
sleep 1
