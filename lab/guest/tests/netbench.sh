#!/bin/sh
# The network benchmark's guest: cloister.nets=ADDR/PREFIX@PEER for its NIC, then iperf3 to the
# peer for cloister.secs=N seconds (default 5) each: upload and download with 1 and 4 streams,
# and the round trip of 100 pings 20 ms apart. Reports CLOISTER-NETBENCH job=NAME value=V
# (bits a second, or microseconds).
nets=
secs=5
for word in $(cat /proc/cmdline); do
    case "$word" in
    cloister.nets=*) nets=${word#cloister.nets=} ;;
    cloister.secs=*) secs=${word#cloister.secs=} ;;
    esac
done
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
addr=${nets%@*}
peer=${nets#*@}
ip link set lo up
ip link set "$nic" up
ip addr add "$addr" dev "$nic"
i=0
until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 30 ] || { echo "CLOISTER-NETBENCH ping=failed"; exit 1; }
done
for job in up1 up4 down1 down4; do
    flag=
    case $job in down*) flag=-R ;; esac
    bps=$(iperf3 -c "$peer" -t "$secs" -P "${job#*[pn]}" $flag -J |
        sed -n 's/.*"bits_per_second":[[:space:]]*\([0-9.e+]*\).*/\1/p' | tail -n1)
    echo "CLOISTER-NETBENCH job=$job value=${bps:-0}"
done
rtt=$(ping -c 100 -i 0.02 "$peer" | sed -n 's|.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p')
echo "CLOISTER-NETBENCH job=rtt_us value=$(echo "$rtt" | awk '{printf "%.0f", $1 * 1000}')"
