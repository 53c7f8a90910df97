# Runs inside the lab (bench/net --lab prepends reps= and secs=). The guest's netbench test
# (iperf3 up and down with 1 and 4 streams, and a ping round trip) against the lab host through
# (a) cloister with our vhost-user-net on a tap it starts, (b) QEMU 10 (q35, virtio-net-pci,
# -netdev vhost-user) with our vhost-user-net, (c) QEMU with a tap and the kernel's vhost-net
# (vhost=on). Same guest kernel and initramfs, 2 vCPUs, 1 GiB, two queue pairs, runs
# alternating; only the ratios of the medians mean anything in the lab.
cmdline=$(guest_cmdline netbench "cloister.nets=10.30.0.2/24@10.30.0.1" "cloister.secs=$secs")
initramfs=$GUEST_DIR/initramfs-tools.cpio
out=$RESULTS_DIR
run_limit=$((240 + 6 * secs))
iperf3 -s -D -B 10.30.0.1 2>/dev/null || true

# finish LOG: waits for the VM ($vm) at most run_limit seconds.
finish() {
    t=0
    while kill -0 "$vm" 2>/dev/null && [ "$t" -lt "$run_limit" ]; do sleep 1; t=$((t + 1)); done
    if kill -0 "$vm" 2>/dev/null; then
        echo "!! $(basename "$1"): still running after $run_limit s, killed"
        kill -9 "$vm"
    fi
    wait "$vm"
}

# The lab host's side of tap TAP: its address, and an iperf3 server on it.
host_side() {
    ip addr add 10.30.0.1/24 dev "$1" 2>/dev/null
    ip link set "$1" up
    kill $(pidof iperf3) 2>/dev/null
    sleep 0.2
    iperf3 -s -D -B 10.30.0.1
}

cloister_run() {
    "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" --initramfs "$initramfs" --cmdline "$cmdline" \
        --cpus boot=2 --memory size=1G --net "tap=bnet0,ip=10.30.0.1,mask=255.255.255.0,num_queues=4" \
        --serial "file=$1" >"$1.vmm" 2>&1 &
    vm=$!
    for _ in $(seq 100); do ip link show bnet0 >/dev/null 2>&1 && break; sleep 0.1; done
    sleep 0.5
    host_side bnet0
    finish "$1"
}

qemu_ours_run() {
    rm -f "$out/net.sock"
    "$BIN_DIR/vhost-user-net" --socket "$out/net.sock" --tap bnet1 --ip 10.30.0.1 \
        --mask 255.255.255.0 --queues 2 --log-level warn 2>"$out/backend.log" &
    backend=$!
    wait_socket "$out/net.sock"
    host_side bnet1
    qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G -smp 2 \
        -nodefaults -no-reboot -nographic -serial "file:$1" \
        -chardev "socket,id=n0,path=$out/net.sock" \
        -netdev vhost-user,id=net0,chardev=n0,queues=2 \
        -device virtio-net-pci,netdev=net0,mq=on,vectors=6,romfile= \
        -kernel "$GUEST_DIR/bzImage" -initrd "$initramfs" -append "$cmdline" >"$1.vmm" 2>&1 &
    vm=$!
    finish "$1"
    kill "$backend" 2>/dev/null
    wait "$backend" 2>/dev/null
}

qemu_vhost_run() {
    ip tuntap add dev bnet2 mode tap multi_queue 2>/dev/null
    host_side bnet2
    qemu-system-x86_64 -accel kvm -cpu host -M q35 -m 1G -smp 2 \
        -nodefaults -no-reboot -nographic -serial "file:$1" \
        -netdev tap,id=net0,ifname=bnet2,script=no,downscript=no,vhost=on,queues=2 \
        -device virtio-net-pci,netdev=net0,mq=on,vectors=6,romfile= \
        -kernel "$GUEST_DIR/bzImage" -initrd "$initramfs" -append "$cmdline" >"$1.vmm" 2>&1 &
    vm=$!
    finish "$1"
    ip link del bnet2 2>/dev/null
}

rep=1
while [ $rep -le "$reps" ]; do
    cloister_run "$out/cloister.$rep.log"
    qemu_ours_run "$out/qemu-ours.$rep.log"
    qemu_vhost_run "$out/qemu-vhost.$rep.log"
    for v in cloister qemu-ours qemu-vhost; do
        n=$(grep -c "CLOISTER-NETBENCH job" "$out/$v.$rep.log")
        echo "run $rep $v: $n results"
        grep "CLOISTER-NETBENCH" "$out/$v.$rep.log" | tr -d '\r' | sed 's/^/   /'
        if [ "$n" = 0 ]; then
            echo "   !! no results; the VMM said:"
            sed 's/^/   !!   /' "$out/$v.$rep.log.vmm"
            tail -n 8 "$out/$v.$rep.log" | tr -d '\r' | sed 's/^/   !!   /'
        fi
    done
    rep=$((rep + 1))
done

for f in "$out"/cloister.*.log "$out"/qemu-ours.*.log "$out"/qemu-vhost.*.log; do
    v=$(basename "$f" | cut -d. -f1)
    grep "CLOISTER-NETBENCH job=" "$f" | tr -d '\r' | awk -v v="$v" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        print v, f["job"], f["value"]
    }'
done >"$out/samples"

echo "== guest network in the lab: medians over $reps runs each, alternating"
echo "   (throughput in Mbit/s, >1 is Cloister faster; rtt in microseconds, <1 is Cloister faster)"
awk '
    { n[$1, $2]++; v[$1, $2, n[$1, $2]] = $3; if (!($2 in seen)) { seen[$2] = 1; order[++jobs] = $2 } }
    function median(vmm, job,   k, i, j, t, a) {
        k = n[vmm, job]
        for (i = 1; i <= k; i++) a[i] = v[vmm, job, i] + 0
        for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return k == 0 ? 0 : (k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2)
    }
    END {
        printf "   %-8s %12s %12s %12s %14s %14s\n", "job", "cloister", "qemu+ours", "qemu+vhost", "cl/qemu-vhost", "cl/qemu-ours"
        for (i = 1; i <= jobs; i++) {
            j = order[i]; c = median("cloister", j); o = median("qemu-ours", j); h = median("qemu-vhost", j)
            s = (j ~ /rtt/) ? 1 : 1e6
            r = (h > 0) ? sprintf("%.2f", c / h) : "na"; ro = (o > 0) ? sprintf("%.2f", c / o) : "na"
            printf "   %-8s %12.1f %12.1f %12.1f %14s %14s\n", j, c / s, o / s, h / s, r, ro
            printf "@@CLOISTER-MARK ratio.%s=%s@@\n", j, r
        }
    }' "$out/samples"
