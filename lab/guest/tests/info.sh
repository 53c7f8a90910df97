#!/bin/sh
# Reports what the guest sees of its CPUs and memory, for the VMM's topology and memory tests.
online=$(cat /sys/devices/system/cpu/online)
count=$(grep -c '^processor' /proc/cpuinfo)
memtotal=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
# "Memory: 481428K/523896K available (...)": the second figure is all the RAM the firmware's
# memory map gave the kernel, before the kernel keeps its own share (MemTotal excludes that).
physical=$(dmesg | sed -n 's|.*Memory: [0-9]*K/\([0-9]*\)K available.*|\1|p' | head -n1)
echo "CLOISTER-INFO cpus=$count online=$online memtotal_kb=$memtotal memory_map_kb=$physical"
echo "CLOISTER-INFO kernel=$(uname -r)"
