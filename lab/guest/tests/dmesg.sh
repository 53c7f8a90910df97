#!/bin/sh
# Prints the kernel log and the uptime at userspace, for looking into boot time.
echo "CLOISTER-UPTIME $(cut -d' ' -f1 /proc/uptime)"
dmesg
echo "CLOISTER-CLOCKSOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
grep -m1 '^flags' /proc/cpuinfo
cat /proc/interrupts
