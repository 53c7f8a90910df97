#!/bin/sh
# ACPI hot-plug as the host drives it through cloister's API: a disk appears (acpiphp scans its
# slot), takes data, and goes (the guest lets go of it and ejects it); then the power button
# reaches Linux's button driver. Each step is a line for the host to wait on:
#   CLOISTER-HOTPLUG ready
#   CLOISTER-HOTPLUG added=vda written=SHA256 read=SHA256
#   CLOISTER-HOTPLUG removed=vda
#   CLOISTER-HOTPLUG button-ready
#   CLOISTER-HOTPLUG button=pressed
# The power button's driver, and evdev for its events.
for m in button evdev; do modprobe "$m" || echo "CLOISTER-HOTPLUG no-module=$m"; done
echo "CLOISTER-HOTPLUG ready"
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
    echo "CLOISTER-HOTPLUG added=none"
    exit 1
fi
dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 2>/dev/null
want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of=/dev/vda bs=1M conv=fsync 2>/dev/null
got=$(dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
slot=$(basename "$(readlink -f /sys/block/vda/device/..)")
echo "CLOISTER-HOTPLUG added=vda written=$want read=$got pci=$slot"
i=0
while [ -e /sys/block/vda ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
if [ -e /sys/block/vda ]; then
    echo "CLOISTER-HOTPLUG removed=none"
    exit 1
fi
echo "CLOISTER-HOTPLUG removed=vda"
event=
for d in /sys/class/input/input*; do
    if [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ]; then
        event=$(basename "$(ls -d "$d"/event* 2>/dev/null | head -1)")
    fi
done
if [ -z "$event" ]; then
    echo "CLOISTER-HOTPLUG button=no-device"
    ls /sys/bus/acpi/devices/
    cat /sys/class/input/*/name
    lsmod
    dmesg | grep -i -e button -e ACPI0013 -e GED -e PNP0C0C
    exit 1
fi
# The reader must hold the device open before the host presses: evdev keeps events only for
# readers that have it open.
timeout 120 dd if="/dev/input/$event" bs=24 count=1 of=/tmp/event 2>/dev/null &
reader=$!
i=0
until ls -l "/proc/$reader/fd" 2>/dev/null | grep -q "input/$event"; do
    [ "$i" -lt 100 ] || break
    sleep 0.1
    i=$((i + 1))
done
echo "CLOISTER-HOTPLUG button-ready"
# One input event (24 bytes on x86_64) from the button: KEY_POWER down.
if wait "$reader" && [ -s /tmp/event ]; then
    echo "CLOISTER-HOTPLUG button=pressed"
else
    echo "CLOISTER-HOTPLUG button=silent"
    exit 1
fi
