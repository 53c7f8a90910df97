#!/bin/sh
# Disk and network load for a pause: writes 4 MiB patterns to /dev/vda (fsync) and pings the
# host every 10 ms, both in the background, says "CLOISTER-PAUSE loaded" once both run, and
# goes on for cloister.hold seconds (default 60), through whatever pause the host makes; then
# checks that the last pattern written reads back and that pings were answered after the
# pause:
#   CLOISTER-PAUSE done written=SHA read=SHA passes=N pings=N
hold=60
for word in $(cat /proc/cmdline); do
    case "$word" in
    cloister.hold=*) hold=${word#cloister.hold=} ;;
    esac
done
ip addr add 10.10.9.2/24 dev eth0
ip link set eth0 up
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
(
    pass=0
    while [ ! -e /tmp/stop ]; do
        dd if=/tmp/pattern of=/dev/vda bs=1M conv=fsync 2>/dev/null
        pass=$((pass + 1))
        echo "$pass" >/tmp/passes
    done
) &
writer=$!
ping -i 0.01 10.10.9.1 >/tmp/ping.log 2>&1 &
pinger=$!
i=0
while { [ ! -s /tmp/passes ] || ! grep -q "bytes from" /tmp/ping.log; } && [ "$i" -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
done
echo "CLOISTER-PAUSE loaded"
sleep "$hold"
touch /tmp/stop
wait "$writer"
kill "$pinger"
want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
pings=$(grep -c "bytes from" /tmp/ping.log)
echo "CLOISTER-PAUSE done written=$want read=$got passes=$(cat /tmp/passes) pings=$pings"
[ "$want" = "$got" ]
