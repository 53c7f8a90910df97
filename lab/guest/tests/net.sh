#!/bin/sh
# Brings up the first NIC and talks to a peer: cloister.ip=ADDR/PREFIX, cloister.peer=ADDR
# (defaults 10.0.2.2/24 and 10.0.2.1). Pings it, and with cloister.iperf=SECS runs an iperf3
# client against it. Reports CLOISTER-NET key=value lines.
ip=10.0.2.2/24
peer=10.0.2.1
iperf=
for word in $(cat /proc/cmdline); do
    case "$word" in
    cloister.ip=*) ip=${word#cloister.ip=} ;;
    cloister.peer=*) peer=${word#cloister.peer=} ;;
    cloister.iperf=*) iperf=${word#cloister.iperf=} ;;
    esac
done
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
if [ -z "$nic" ]; then
    echo "CLOISTER-NET nic=none"
    exit 1
fi
ip link set lo up
ip link set "$nic" up
ip addr add "$ip" dev "$nic"
echo "CLOISTER-NET nic=$nic mac=$(cat /sys/class/net/$nic/address) mtu=$(cat /sys/class/net/$nic/mtu)"
# The peer may need a moment to answer ARP.
if ping -c 3 -W 2 "$peer" >/tmp/ping.log 2>&1 || ping -c 3 -W 2 "$peer" >/tmp/ping.log 2>&1; then
    echo "CLOISTER-NET ping=ok"
else
    cat /tmp/ping.log
    echo "CLOISTER-NET ping=failed"
    exit 1
fi
if [ -n "$iperf" ]; then
    if ! command -v iperf3 >/dev/null; then
        echo "CLOISTER-NET iperf=missing (boot with initramfs-tools.cpio)"
        exit 1
    fi
    bps=$(iperf3 -c "$peer" -t "$iperf" -J | sed -n 's/.*"bits_per_second":[[:space:]]*\([0-9.e+]*\).*/\1/p' | tail -n1)
    echo "CLOISTER-NET iperf_bps=$bps"
fi
