#!/bin/sh
# Asks for a reboot; the VMM reports it and exits 0.
reboot -f
sleep 5
exit 1
