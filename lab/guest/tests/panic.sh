#!/bin/sh
# Panics the guest kernel on purpose (sysrq crash); the VMM must report it and exit non-zero.
echo "guest: triggering a kernel panic"
echo 1 > /proc/sys/kernel/sysrq
echo c > /proc/sysrq-trigger
sleep 5
echo "guest: still alive after the panic trigger"
exit 1
