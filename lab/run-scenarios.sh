#!/bin/sh
# Runs the payload's scenarios in order: scenarios/NNN-NAME/script.sh, each in its own results
# directory, each bounded by its timeout. The harness splits the console on the markers below.
# Runs inside the lab (L1) or, on a host with hardware KVM, directly on the host.
payload=$(cd "$(dirname "$0")" && pwd)
export PAYLOAD_DIR="$payload"
export BIN_DIR="$payload/bin"
export GUEST_DIR="${GUEST_DIR:-/guest}"
export LAB_LIB="$payload/scenario-lib.sh"

for dir in "$payload"/scenarios/*/; do
    name=$(basename "$dir")
    name=${name#*-}
    export RESULTS_DIR="$payload/results/$name"
    export SCENARIO_DIR="${dir%/}"
    mkdir -p "$RESULTS_DIR"
    limit=$(cat "$dir/timeout" 2>/dev/null || echo 300)
    start=$(date +%s)
    echo "@@CLOISTER-SCENARIO-BEGIN $name@@"
    # /bin/sh by path: busybox's timeout would run its own shell applet for a bare `sh`.
    (cd "$RESULTS_DIR" && exec timeout "$limit" /bin/sh -c '. "$LAB_LIB"; . "$1"' sh "$dir/script.sh") </dev/null 2>&1
    rc=$?
    # The scenario's output may end mid-line (a guest console); markers start a line.
    echo
    echo "@@CLOISTER-MARK scenario.seconds=$(($(date +%s) - start))@@"
    echo "@@CLOISTER-SCENARIO-END $name rc=$rc@@"
done
