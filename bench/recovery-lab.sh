# Runs inside the lab (bench/recovery prepends kills=). How long a guest waits when a device's
# backend is killed with SIGKILL: from the kill to the guest's next completed request, `kills`
# times per row, the median and the worst. Rows: a disk and a NIC, each with the backend
# cloister starts (managed: started again by cloister) and with an operator's (killed and
# started again at once by this script: cloister finds it again), and QEMU 10 with the same
# operator backends (its vhost-user chardev with reconnect-ms=100) as the peer.
#
# Disk: the guest's blkstall test reads 4 KiB at a time with O_DIRECT and logs every read's
# latency; the read in flight at a kill completes only once a backend takes it up again, so
# each kill shows as one long read, and that read's latency is the figure (the emulation
# stalls a few reads by itself: the `kills` longest reads of a row are taken).
# NIC: the guest pings the lab host every 10 ms; a kill shows as a run of unanswered pings,
# and its length is the figure (to 10 ms).
# The lab's software emulation makes every step slower than on hardware: compare the rows.
img=/tmp/bench-recovery.img
truncate -s 256M "$img"
initramfs=$GUEST_DIR/initramfs-tools.cpio
out=$RESULTS_DIR
secs=$((kills * 2 + 20))
samples=$out/samples

# kill_loop PROGRAM RESTART: `kills` times, SIGKILL PROGRAM's process 1.5 s apart; RESTART
# (a shell command, or empty) starts an operator's backend again at once.
kill_loop() {
    k=0
    while [ "$k" -lt "$kills" ]; do
        sleep 1.5
        pid=$(pidof "$1") || { echo "!! no $1 to kill"; return; }
        kill -KILL $pid
        k=$((k + 1))
        if [ -n "$2" ]; then
            while kill -0 $pid 2>/dev/null; do sleep 0.01; done
            eval "$2"
        fi
    done
}

# wait_text FILE TEXT SECONDS
wait_text() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null && [ "$i" -lt $(($3 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
}

blk_op() {
    rm -f "$out/blk.sock"
    "$BIN_DIR/vhost-user-blk" --socket "$out/blk.sock" --image "$img" >>"$out/blk-op.log" 2>&1 &
    wait_socket "$out/blk.sock"
}

# blk_row ROW VMM MODE: one VM reading while its disk's backend is killed; its stalls go to
# $samples as "ROW ms".
blk_row() {
    row=$1
    log=$out/$row.console
    cmdline=$(guest_cmdline blkstall "cloister.secs=$secs")
    restart=
    case "$2-$3" in
    cloister-managed) disk="path=$img" ;;
    cloister-operator) blk_op; disk="socket=$out/blk.sock"; restart=blk_op ;;
    qemu-operator) blk_op; restart=blk_op ;;
    esac
    if [ "$2" = cloister ]; then
        "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" --initramfs "$initramfs" \
            --cmdline "$cmdline" --memory size=1G --disk "$disk" --serial "file=$log" \
            >"$out/$row.vmm" 2>&1 &
    else
        qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
            -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G -smp 1 \
            -nodefaults -no-reboot -nographic -serial "file:$log" \
            -chardev "socket,id=blk0,path=$out/blk.sock,reconnect-ms=100" \
            -device vhost-user-blk-pci,chardev=blk0,num-queues=1 \
            -kernel "$GUEST_DIR/bzImage" -initrd "$initramfs" -append "$cmdline" \
            >"$out/$row.vmm" 2>&1 &
    fi
    vm=$!
    wait_text "$log" "CLOISTER-STALL start" 300
    kill_loop vhost-user-blk "$restart"
    wait_text "$log" "CLOISTER-STALL done" $((secs + 60))
    kill -TERM "$vm" 2>/dev/null
    wait "$vm"
    kill -TERM $(pidof vhost-user-blk) 2>/dev/null
    # The emulation stalls some reads by itself: each kill's is among the `kills` longest.
    sed -n 's/.*CLOISTER-STALL ms=\([0-9]*\).*/\1/p' "$log" | sort -n | tail -n "$kills" |
        sed "s/^/$row /" >>"$samples"
    echo "   $row: $(grep -c 'CLOISTER-STALL ms=' "$log") reads over 20 ms, $(grep -o 'done ios=[0-9]*' "$log")"
}

net_op() {
    "$BIN_DIR/vhost-user-net" --socket "$out/net.sock" --tap ctapr --ip 10.31.0.1 \
        --mask 255.255.255.0 --host-mac 02:31:00:00:00:01 >>"$out/net-op.log" 2>&1 &
    wait_socket "$out/net.sock"
}

# net_row ROW VMM MODE: the guest pings the lab host every 10 ms while the NIC's backend is
# killed; each run of unanswered pings (10 ms each) goes to $samples.
net_row() {
    row=$1
    log=$out/$row.console
    cmdline=$(guest_cmdline netcheck "cloister.nets=10.31.0.2/24@10.31.0.1" "cloister.flood=$secs")
    restart=
    case "$2-$3" in
    cloister-managed) nic="tap=ctapr,ip=10.31.0.1,mask=255.255.255.0" ;;
    cloister-operator) rm -f "$out/net.sock"; net_op; nic="socket=$out/net.sock"; restart=net_op ;;
    qemu-operator) rm -f "$out/net.sock"; net_op; restart=net_op ;;
    esac
    if [ "$2" = cloister ]; then
        "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" --initramfs "$initramfs" \
            --cmdline "$cmdline" --memory size=1G --net "$nic" --serial "file=$log" \
            >"$out/$row.vmm" 2>&1 &
    else
        qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
            -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G -smp 1 \
            -nodefaults -no-reboot -nographic -serial "file:$log" \
            -chardev "socket,id=n0,path=$out/net.sock,reconnect-ms=100" \
            -netdev vhost-user,id=net0,chardev=n0 \
            -device virtio-net-pci,netdev=net0,mac=02:31:00:00:00:02,romfile= \
            -kernel "$GUEST_DIR/bzImage" -initrd "$initramfs" -append "$cmdline" \
            >"$out/$row.vmm" 2>&1 &
    fi
    vm=$!
    wait_text "$log" "CLOISTER-NET flooding" 300
    sleep 1
    kill_loop vhost-user-net "$restart"
    wait_text "$log" "CLOISTER-NET flooded" $((secs + 60))
    kill -TERM "$vm" 2>/dev/null
    wait "$vm"
    kill -TERM $(pidof vhost-user-net) 2>/dev/null
    sleep 0.5
    sed -n 's/.*CLOISTER-NET gap_ms=\([0-9]*\).*/\1/p' "$log" | sort -n | tail -n "$kills" |
        sed "s/^/$row /" >>"$samples"
    echo "   $row: $(grep -c 'gap_ms=' "$log") gaps, $(grep -o 'flooded=[0-9]*' "$log")"
}

: >"$samples"
echo "== disk: kill to the guest's next completed read, $kills kills per row"
blk_row blk-cloister-managed cloister managed
blk_row blk-cloister-operator cloister operator
blk_row blk-qemu-operator qemu operator
echo "== NIC: kill to the guest's next answered ping, $kills kills per row"
net_row net-cloister-managed cloister managed
net_row net-cloister-operator cloister operator
net_row net-qemu-operator qemu operator

echo "== medians (ms), worst in brackets; n = stalls seen (one per kill expected)"
awk '
    { n[$1]++; v[$1, n[$1]] = $2; if (!($1 in seen)) { seen[$1] = 1; order[++rows] = $1 } }
    END {
        for (r = 1; r <= rows; r++) {
            row = order[r]; k = n[row]
            for (i = 1; i <= k; i++) a[i] = v[row, i] + 0
            for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            m = (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
            printf "   %-24s median %6.0f ms  [%6.0f]  n=%d\n", row, m, a[k], k
            printf "@@CLOISTER-MARK median.%s=%d@@\n", row, m
        }
    }' "$samples"
for kind in blk net; do
    c=$(awk -v r="$kind-cloister-operator" '$1 == r' "$samples" | sort -n -k2 | awk '{ a[NR] = $2 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
    q=$(awk -v r="$kind-qemu-operator" '$1 == r' "$samples" | sort -n -k2 | awk '{ a[NR] = $2 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
    awk -v c="$c" -v q="$q" -v k="$kind" 'BEGIN { if (q > 0) printf "   %s operator, cloister/qemu: %.2f\n", k, c / q }'
done
for row in blk-cloister-managed blk-cloister-operator net-cloister-managed net-cloister-operator; do
    echo "--- $row: cloister's log ---"
    grep -E "back after|given up|refused" "$out/$row.vmm" | tail -n 3
done
