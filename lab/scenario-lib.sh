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
