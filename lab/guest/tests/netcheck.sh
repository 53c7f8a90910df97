#!/bin/sh
# The network test: brings up every NIC with cloister.nets=ADDR/PREFIX@PEER,... (in order) and
# pings each peer (cloister.pingsize=N: also with N-byte pings). Then, on the first NIC:
# cloister.big=1 fetches the peer's 100 MiB http://PEER:8080/big and serves 100 MiB of its own
# on port 8080 until the peer has fetched it (it then makes http://PEER:8080/fetched);
# cloister.iperf=SECS runs iperf3 both ways with cloister.streams=N streams;
# cloister.hold=SECS keeps pinging the peer that long; cloister.flood=SECS pings it every 10 ms
# that long and reports each run of 5 or more unanswered pings as a gap (its length at 10 ms a
# ping). Reports CLOISTER-NET key=value lines.
nets=
pingsize=
big=
iperf=
streams=1
hold=
flood=
for word in $(cat /proc/cmdline); do
    case "$word" in
    cloister.nets=*) nets=${word#cloister.nets=} ;;
    cloister.pingsize=*) pingsize=${word#cloister.pingsize=} ;;
    cloister.big=*) big=${word#cloister.big=} ;;
    cloister.iperf=*) iperf=${word#cloister.iperf=} ;;
    cloister.streams=*) streams=${word#cloister.streams=} ;;
    cloister.hold=*) hold=${word#cloister.hold=} ;;
    cloister.flood=*) flood=${word#cloister.flood=} ;;
    esac
done
ip link set lo up
nics=$(ls /sys/class/net | grep -v '^lo$' | sort)
echo "CLOISTER-NET nics=$(echo $nics | tr ' ' ',')"
# The features the driver negotiated: a string of 0/1, bit i at position i+1.
bit() { cut -c$(($2 + 1)) "/sys/class/net/$1/device/features"; }
# until_ping PEER TRIES [SIZE]: pings until one answer (ARP, a peer still booting).
until_ping() {
    i=0
    while [ "$i" -lt "$2" ]; do
        ping -c 1 -W 1 ${3:+-s "$3"} "$1" >/dev/null 2>&1 && return 0
        i=$((i + 1))
    done
    return 1
}
n=0
first_peer=
rc=0
for spec in $(echo "$nets" | tr ',' ' '); do
    n=$((n + 1))
    nic=$(echo $nics | cut -d' ' -f$n)
    addr=${spec%@*}
    peer=${spec#*@}
    [ -n "$first_peer" ] || first_peer=$peer
    ip link set "$nic" up
    ip addr add "$addr" dev "$nic"
    pairs=$(ls -d /sys/class/net/$nic/queues/rx-* | wc -l)
    line="nic=$nic mac=$(cat /sys/class/net/$nic/address) mtu=$(cat /sys/class/net/$nic/mtu) pairs=$pairs"
    line="$line csum=$(bit $nic 0) guest_tso4=$(bit $nic 7) host_tso4=$(bit $nic 11) mrg_rxbuf=$(bit $nic 15) ctrl_vq=$(bit $nic 17) mq=$(bit $nic 22)"
    if until_ping "$peer" 60; then p=ok; else p=failed; rc=1; fi
    line="$line ping=$p"
    if [ -n "$pingsize" ]; then
        if until_ping "$peer" 5 "$pingsize"; then p=ok; else p=failed; rc=1; fi
        line="$line bigping=$p"
    fi
    echo "CLOISTER-NET-$n $line"
done
[ -n "$first_peer" ] || { echo "CLOISTER-NET nets=none"; exit 1; }
if [ -n "$big" ]; then
    got=$(wget -q -O - "http://$first_peer:8080/big" | sha256sum | cut -d' ' -f1)
    echo "CLOISTER-NET fetched=$got"
    mkdir -p /tmp/www
    dd if=/dev/urandom of=/tmp/www/big bs=1M count=100 2>/dev/null
    echo "CLOISTER-NET served=$(sha256sum </tmp/www/big | cut -d' ' -f1)"
    httpd -p 8080 -h /tmp/www
    echo "CLOISTER-NET serving"
    i=0
    until wget -q -O /dev/null "http://$first_peer:8080/fetched" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -lt 600 ] || { echo "CLOISTER-NET peer_fetched=timeout"; rc=1; break; }
        sleep 0.5
    done
    rm -f /tmp/www/big
fi
if [ -n "$iperf" ]; then
    for dir in up down; do
        flag=
        [ "$dir" = down ] && flag=-R
        bps=$(iperf3 -c "$first_peer" -t "$iperf" -P "$streams" $flag -J |
            sed -n 's/.*"bits_per_second":[[:space:]]*\([0-9.e+]*\).*/\1/p' | tail -n1)
        echo "CLOISTER-NET iperf_$dir=$bps"
        [ -n "$bps" ] || rc=1
    done
fi
if [ -n "$hold" ]; then
    echo "CLOISTER-NET holding"
    ping -c "$hold" -W 1 "$first_peer" >/tmp/hold.log 2>&1
    echo "CLOISTER-NET held=$(grep -c 'bytes from' /tmp/hold.log)"
fi
if [ -n "$flood" ]; then
    echo "CLOISTER-NET flooding"
    ping -i 0.01 -W 1 -w "$flood" "$first_peer" 2>/dev/null |
        awk -F'seq=' '/seq=/ { split($2, f, " "); s = f[1] + 0
            if (seen && s - last > 5) printf "CLOISTER-NET gap_ms=%d\n", (s - last - 1) * 10
            last = s; seen = 1 } END { printf "CLOISTER-NET flooded=%d\n", last }'
fi
# Interrupts per receive queue of the first NIC (virtioN-input.Q), to see which queues worked.
irqs=$(grep -E 'input\.[0-9]+' /proc/interrupts | awk '{s=0; for (i=2; i<NF; i++) if ($i ~ /^[0-9]+$/) s+=$i; print $NF "=" s}' | tr '\n' ' ')
echo "CLOISTER-NET irqs $irqs"
exit $rc
