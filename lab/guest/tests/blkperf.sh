#!/bin/sh
# 64 MiB written to and read back from /dev/vda with O_DIRECT between two markers (2048
# requests of 64 KiB); the scenario samples the VMM's CPU time at each marker.
echo "CLOISTER-BLK-PERF-START"
sleep 1
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/dev/vda bs=64k count=1024 oflag=direct 2>/dev/null
dd if=/dev/vda of=/dev/null bs=64k count=1024 iflag=direct 2>/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
echo "CLOISTER-BLK-PERF-END start=$start end=$end"
sleep 1
