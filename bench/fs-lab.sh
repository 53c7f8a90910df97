# Runs inside the lab (bench/fs prepends reps=, secs= and files=). The guest's fsbench test (fio
# on a virtio-fs share, then a metadata job) through (a) cloister over virtio-pci and (b) QEMU
# 10 (q35, vhost-user-fs-pci), both against the same Rust virtiofsd started the same way
# (--cache=never, so every read and write crosses the device), same guest kernel and initramfs,
# 1 vCPU, 1 GiB, one request queue of 1024. Runs alternate; only the ratios of the medians mean
# anything in the lab.
share=/tmp/bench-share
mkdir -p "$share"
cmdline=$(guest_cmdline fsbench "cloister.fsbench_secs=$secs" "cloister.fsbench_files=$files")
initramfs=$GUEST_DIR/initramfs-tools.cpio
out=$RESULTS_DIR
run_limit=$((180 + 8 * secs + files / 5))

# daemon: a fresh virtiofsd on $out/vfs.sock; sets $vfs.
daemon() {
    rm -f "$out/vfs.sock"
    virtiofsd --socket-path="$out/vfs.sock" --shared-dir="$share" --cache=never \
        --log-level=error >"$out/virtiofsd.log" 2>&1 &
    vfs=$!
    wait_socket "$out/vfs.sock" || cat "$out/virtiofsd.log"
}

# finish LOG: waits for the VM ($vm) at most run_limit seconds, then stops the daemon.
finish() {
    t=0
    while kill -0 "$vm" 2>/dev/null && [ "$t" -lt "$run_limit" ]; do sleep 1; t=$((t + 1)); done
    if kill -0 "$vm" 2>/dev/null; then
        echo "!! $(basename "$1"): still running after $run_limit s, killed"
        kill -9 "$vm"
    fi
    wait "$vm"
    kill "$vfs" 2>/dev/null
    wait "$vfs" 2>/dev/null
}

cloister_run() {
    daemon
    "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" --initramfs "$initramfs" --cmdline "$cmdline" \
        --cpus boot=1 --memory size=1G --fs "tag=bench,socket=$out/vfs.sock,queue_size=1024" \
        --serial "file=$1" >"$1.vmm" 2>&1 &
    vm=$!
    finish "$1"
}

qemu_run() {
    daemon
    qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=1G,share=on -m 1G -smp 1 \
        -nodefaults -no-reboot -nographic -serial "file:$1" \
        -chardev "socket,id=vfs,path=$out/vfs.sock" \
        -device vhost-user-fs-pci,chardev=vfs,tag=bench,queue-size=1024 \
        -kernel "$GUEST_DIR/bzImage" -initrd "$initramfs" -append "$cmdline" >"$1.vmm" 2>&1 &
    vm=$!
    finish "$1"
}

rep=1
while [ $rep -le "$reps" ]; do
    cloister_run "$out/cloister.$rep.log"
    qemu_run "$out/qemu.$rep.log"
    for v in cloister qemu; do
        n=$(grep -c CLOISTER-FSBENCH "$out/$v.$rep.log")
        echo "run $rep $v: $n results"
        grep "CLOISTER-FSBENCH" "$out/$v.$rep.log" | tr -d '\r' | sed 's/^/   /'
        if [ "$n" = 0 ]; then
            echo "   !! no results; the VMM said:"
            sed 's/^/   !!   /' "$out/$v.$rep.log.vmm"
            echo "   !! and the console ended with:"
            tail -n 8 "$out/$v.$rep.log" | tr -d '\r' | sed 's/^/   !!   /'
        fi
    done
    rep=$((rep + 1))
done

for f in "$out"/cloister.*.log "$out"/qemu.*.log; do
    v=$(basename "$f" | cut -d. -f1)
    grep "CLOISTER-FSBENCH job=" "$f" | tr -d '\r' | awk -v v="$v" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        print v, f["job"], f["iops"]
    }'
done >"$out/samples"

echo "== guest on a virtio-fs share in the lab: cloister vs QEMU, the same virtiofsd"
echo "   (ratio of median operations a second over $reps runs each, alternating; >1: cloister faster)"
print_ratios "$out/samples"
rm -rf "$share"
