# Runs inside the lab (bench/recovery --soak prepends kills=). The guest's blkrecover test on a
# 1 GiB disk (every 4 KiB block written once with a checksum at queue depth 16, O_DIRECT, a
# flush every 64 writes, 1000 writes a second, then all read back and checked) while the
# disk's managed backend is killed with SIGKILL `kills` times, 1 to 2 s after each recovery;
# then every block is checked again on the lab host. Zero I/O errors and zero bad blocks is
# the only passing result.
img=/tmp/bench-soak.img
truncate -s 1G "$img"
out=$RESULTS_DIR
"$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" --initramfs "$GUEST_DIR/initramfs-tools.cpio" \
    --cmdline "$(guest_cmdline blkrecover cloister.size=1024M)" --memory size=1G \
    --disk "path=$img" --serial "file=$out/console.log" >"$out/vm.log" 2>&1 &
vm=$!
wait_for "$out/console.log" "CLOISTER-BLK-RECOVER writing" 1800
k=0
while [ "$k" -lt "$kills" ] && running "$vm" && ! grep -q "RECOVER done" "$out/console.log"; do
    ms=$((1000 + $(od -An -N2 -tu2 /dev/urandom) % 1000))
    sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    pid=$(pidof vhost-user-blk) || break
    kill -KILL $pid
    k=$((k + 1))
    j=0
    while [ "$(grep -c 'backend back after' "$out/vm.log")" -lt "$k" ] && [ "$j" -lt 150 ]; do
        sleep 0.1; j=$((j + 1))
    done
done
echo "   kills: $k, recoveries: $(grep -c 'backend back after' "$out/vm.log")"
wait_for "$out/console.log" "CLOISTER-BLK-RECOVER done" 12000
grep "CLOISTER-BLK-RECOVER" "$out/console.log"
i=0; while running "$vm" && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
stop_vm
fio --name=recover --filename="$img" --rw=randwrite --bs=4k --size=1024M --verify=crc32c \
    --verify_only --verify_fatal=1 >"$out/host-verify.log" 2>&1
echo "   host verify: rc=$? ($(grep -o 'err= *[0-9]*' "$out/host-verify.log" | head -n1))"
grep -o 'back after [0-9]* ms' "$out/vm.log" | awk '{ print $3 }' | sort -n |
    awk '{ a[NR] = $1 } END { printf "   recovery (cloister: loss to rings replayed): median %d ms, worst %d ms\n", a[int((NR + 1) / 2)], a[NR] }'
rm -f "$img"
