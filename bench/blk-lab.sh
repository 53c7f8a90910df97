# Runs inside the lab (bench/blk-lab prepends reps= and secs=). fio in the test guest, O_DIRECT
# with libaio, through (a) cloister + our vhost-user-blk over virtio-pci and (b) QEMU (q35,
# vhost-user-blk-pci) + qemu-storage-daemon: same guest kernel and initramfs, 1 vCPU, 1 GiB,
# one queue of 256, the same image in the lab's page cache (tmpfs). Runs alternate; the lab's
# emulation makes absolute figures meaningless, so only the ratios of the medians are printed.
img=/tmp/bench-blk.img
dd if=/dev/zero of=$img bs=1M count=512 2>/dev/null
jobs="randread,4k,1,$secs+randread,4k,32,$secs+randwrite,4k,1,$secs+randwrite,4k,32,$secs+read,128k,8,$secs+write,128k,8,$secs"
initramfs=$GUEST_DIR/initramfs-tools.cpio
cmdline=$(guest_cmdline fio "cloister.fio=$jobs")
out=$RESULTS_DIR

# cpu PID: utime+stime in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Longest one VM's boot and fio jobs may take before the run is given up: a guest whose I/O
# stalls must not hold the whole lab boot until its timeout.
run_limit=$((120 + 6 * 4 * secs))

# watchdog PID LOG: in the background, kills the VM (saying so, with its console's last lines)
# if it still runs after run_limit seconds; ends by itself within a second of the VM.
watchdog() {
    (
        t=0
        while kill -0 "$1" 2>/dev/null && [ "$t" -lt "$run_limit" ]; do
            sleep 1
            t=$((t + 1))
        done
        if kill -0 "$1" 2>/dev/null; then
            echo "!! $(basename "$2"): still running after $run_limit s, killed; its console ended with:"
            tail -n 5 "$2" | tr -d '\r' | sed 's/^/!!   /'
            kill -9 "$1"
        fi
    ) &
}

# wait_line FILE TEXT: until TEXT is in FILE, while $vm runs.
wait_line() {
    while ! grep -q "$2" "$1" 2>/dev/null && kill -0 "$vm" 2>/dev/null; do sleep 0.2; done
}

cloister_run() {
    log=$1
    "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" --initramfs "$initramfs" --cmdline "$cmdline" \
        --cpus boot=1 --memory size=1G --disk "path=$img,num_queues=1,queue_size=256" \
        --serial "file=$log" >"$log.vmm" 2>&1 &
    vm=$!
    watchdog "$vm" "$log"
    # The VMM main thread's CPU time from the guest's start to its result: near zero, since
    # kicks and interrupts bypass it.
    wait_line "$log" CLOISTER-GUEST-UP
    before=$(cpu "$vm/task/$vm")
    wait_line "$log" CLOISTER-GUEST-RESULT
    after=$(cpu "$vm/task/$vm")
    rc=0
    wait "$vm" || rc=$?
    echo "rc=$rc" >>"$log.vmm"
    echo "$((after - before))" >"$log.main"
}

qemu_run() {
    log=$1
    rm -f "$out/qsd.sock"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$img,cache.direct=off" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$out/qsd.sock,writable=on,num-queues=1" \
        >"$log.qsd" 2>&1 &
    qsd=$!
    wait_socket "$out/qsd.sock" || cat "$log.qsd"
    qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G -smp 1 \
        -nodefaults -no-reboot -nographic -serial "file:$log" \
        -chardev "socket,id=blk0,path=$out/qsd.sock" \
        -device vhost-user-blk-pci,chardev=blk0,num-queues=1,queue-size=256 \
        -kernel "$GUEST_DIR/bzImage" -initrd "$initramfs" -append "$cmdline" >"$log.vmm" 2>&1 &
    vm=$!
    watchdog "$vm" "$log"
    rc=0
    wait "$vm" || rc=$?
    echo "rc=$rc" >>"$log.vmm"
    kill $qsd
    wait $qsd
}

# (scenario-lib's helpers use $i.)
rep=1
while [ $rep -le "$reps" ]; do
    cloister_run "$out/cloister.$rep.log"
    qemu_run "$out/qemu.$rep.log"
    for v in cloister qemu; do
        echo "run $rep $v: $(grep -c CLOISTER-FIO "$out/$v.$rep.log") fio jobs, $(grep rc= "$out/$v.$rep.log.vmm")"
    done
    rep=$((rep + 1))
done

# One line per job and run: "vmm job iops".
for f in "$out"/cloister.*.log "$out"/qemu.*.log; do
    v=$(basename "$f" | cut -d. -f1)
    grep CLOISTER-FIO "$f" | tr -d '\r' | awk -v v="$v" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        iops = (f["rw"] ~ /read/) ? f["read_iops"] : f["write_iops"]
        printf "%s %s-%s-qd%s %s\n", v, f["rw"], f["bs"], f["qd"], iops
    }'
done >"$out/samples"

echo "== cloister's main thread during the guest's fio runs: $(cat "$out"/cloister.*.log.main | paste -sd' ') clock ticks per run"
echo "== guest fio in the lab: cloister + vhost-user-blk vs QEMU + qemu-storage-daemon"
echo "   (ratio of median IOPS over $reps runs each, alternating; >1 means cloister is faster)"
print_ratios "$out/samples"
