# Helpers for scenario scripts (sourced). A scenario sees BIN_DIR (the project's binaries),
# GUEST_DIR (bzImage, vmlinux, initramfs.cpio), RESULTS_DIR (its working directory; files left
# there reach the test), SCENARIO_DIR (its own files) and PAYLOAD_DIR.

# mark KEY VALUE: a structured result the test reads back.
mark() {
    echo
    echo "@@CLOISTER-MARK $1=$2@@"
}

# guest_cmdline TEST [EXTRA...]: the kernel command line for the test guest running TEST.
guest_cmdline() {
    t=$1
    shift
    echo "console=ttyS0 reboot=k panic=-1 quiet loglevel=4 cloister.test=$t $*"
}

# run NAME CMD...: runs CMD with its output on the console and in NAME.log, then marks NAME.rc.
run() {
    name=$1
    shift
    { "$@"; echo $? >"$RESULTS_DIR/$name.rc"; } 2>&1 | tee "$RESULTS_DIR/$name.log"
    rc=$(cat "$RESULTS_DIR/$name.rc")
    mark "$name.rc" "$rc"
    return "$rc"
}

# wait_socket PATH: until a UNIX socket appears at PATH, for at most 10 s.
wait_socket() {
    i=0
    while [ ! -S "$1" ] && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -S "$1" ]
}

# mark_image_sums DEV FILE: marks img.DEV.OFF = the sha256 of the 2 MiB at each MiB offset the
# guest's blk test writes (0, 5, 37), as the host sees FILE.
mark_image_sums() {
    for off in 0 5 37; do
        mark "img.$1.$off" "$(dd if="$2" bs=1M skip="$off" count=2 2>/dev/null | sha256sum | cut -d' ' -f1)"
    done
}

# wait_for FILE TEXT TENTHS: until TEXT appears in FILE, for at most TENTHS/10 seconds.
wait_for() {
    i=0
    while [ "$i" -lt "$3" ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

# cloister_bg LOG TEST ARGS...: cloister in the background running the guest's TEST, console in
# $RESULTS_DIR/console.log and its own messages in LOG; sets $vm. The guest's initramfs is
# $INITRAMFS if set (initramfs-tools.cpio has fio, iperf3 and the C and Rust runtime
# libraries), else the small one.
cloister_bg() {
    log=$1
    t=$2
    shift 2
    "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
        --initramfs "${INITRAMFS:-$GUEST_DIR/initramfs.cpio}" \
        --cmdline "$(guest_cmdline "$t" $GUEST_ARGS)" --serial "file=$RESULTS_DIR/console.log" "$@" \
        >"$log" 2>&1 &
    vm=$!
}

# running PID: the process exists and has not exited (an unreaped child is a zombie, which
# kill -0 still finds).
running() { [ -e "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# stop_vm: SIGTERM, then up to 30 s for cloister to exit; marks vm.rc (or vm.rc=hung).
stop_vm() {
    kill -TERM "$vm" 2>/dev/null
    i=0
    while running "$vm" && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if running "$vm"; then
        mark vm.rc hung
        kill -KILL "$vm"
    else
        wait "$vm"
        mark vm.rc "$?"
    fi
}

# wait_vm_exit TENTHS: until cloister exits by itself (the guest powered off), then marks
# vm.rc; stops it (stop_vm) if it has not exited by then.
wait_vm_exit() {
    i=0
    while running "$vm" && [ "$i" -lt "$1" ]; do sleep 0.1; i=$((i + 1)); done
    stop_vm
}

# cpu PID: "utime stime guest_time" in clock ticks.
cpu() { awk '{print $14, $15, $43}' "/proc/$1/stat"; }
