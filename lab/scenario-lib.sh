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
