#!/bin/sh
# Reports what the guest sees of its CPUs and memory, for the VMM's topology and memory tests.
online=$(cat /sys/devices/system/cpu/online)
count=$(grep -c '^processor' /proc/cpuinfo)
memtotal=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
echo "CLOISTER-INFO cpus=$count online=$online memtotal_kb=$memtotal"
echo "CLOISTER-INFO kernel=$(uname -r)"
