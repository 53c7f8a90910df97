#!/bin/sh
# The demo: what the guest sees of its CPUs and memory, then its disks and a data round trip.
/tests/info.sh && /tests/blk.sh
