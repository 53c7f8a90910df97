//! Disks: the stock Debian guest reads and writes virtio-blk disks served by vhost-user-blk
//! processes, over PCI and over virtio-mmio, managed by cloister or launched by the operator;
//! read-only disks, several queues, several disks; a backend killed under load is reported
//! and the VM stays stoppable. Also measures the VMM's CPU time during guest I/O.

use std::time::Duration;

use harness::{LabOptions, Scenario, ScenarioOutcome, SharedRun};

static LAB: SharedRun = SharedRun::new("blk", scenarios, LabOptions::default);

/// MiB offsets the guest's `blk` test writes 2 MiB of random data at.
const OFFSETS: [u32; 3] = [0, 5, 37];

/// Shell helpers every scenario gets.
const PRELUDE: &str = r#"
# image NAME: a sparse 64 MiB raw image in the results directory.
image() { truncate -s 64M "$RESULTS_DIR/$1"; echo "$RESULTS_DIR/$1"; }
"#;

/// Boots the test guest running `blk` with cloister's extra `args`, in the foreground;
/// `before` and `after` are shell lines run around it.
fn boot(name: &str, before: &str, args: &str, after: &str) -> Scenario {
    boot_test(name, "blk", before, args, after)
}

fn boot_test(name: &str, test: &str, before: &str, args: &str, after: &str) -> Scenario {
    Scenario::new(
        name,
        &format!(
            r#"{PRELUDE}
            {before}
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
                --initramfs "$GUEST_DIR/initramfs.cpio" \
                --cmdline "$(guest_cmdline {test})" {args}
            {after}
            "#
        ),
    )
    .timeout(Duration::from_secs(240))
}

fn scenarios() -> Vec<Scenario> {
    vec![
        boot(
            "pci-managed",
            r#"a=$(image a.img)"#,
            r#"--disk "path=$a""#,
            r#"mark_image_sums vda "$a"; rm -f "$a""#,
        ),
        boot(
            "mmio-managed",
            r#"a=$(image a.img)"#,
            r#"--disk "path=$a,transport=mmio""#,
            r#"mark_image_sums vda "$a"; rm -f "$a""#,
        ),
        boot(
            "operator-socket",
            r#"a=$(image a.img)
            "$BIN_DIR/vhost-user-blk" --socket "$RESULTS_DIR/op.sock" --image "$a" --queues 2 &
            backend=$!"#,
            r#"--disk "socket=$RESULTS_DIR/op.sock""#,
            r#"mark_image_sums vda "$a"
            # The backend outlives the VM and serves it again: it is the operator's.
            kill -0 "$backend" && mark backend.alive yes
            kill -TERM "$backend"; wait "$backend"; mark backend.rc $?
            rm -f "$a""#,
        ),
        boot(
            "readonly",
            r#"a=$(image a.img)
            dd if=/dev/urandom of="$a" bs=1M count=64 conv=notrunc 2>/dev/null
            mark img.before "$(sha256sum <"$a" | cut -d' ' -f1)"
            mark img.head "$(dd if="$a" bs=1M count=2 2>/dev/null | sha256sum | cut -d' ' -f1)""#,
            r#"--disk "path=$a,readonly=on""#,
            r#"mark img.after "$(sha256sum <"$a" | cut -d' ' -f1)"; rm -f "$a""#,
        ),
        boot(
            "four-queues",
            r#"a=$(image a.img)"#,
            r#"--cpus boot=4 --disk "path=$a,num_queues=4""#,
            r#"mark_image_sums vda "$a"; rm -f "$a""#,
        ),
        boot(
            "two-disks",
            r#"a=$(image a.img); b=$(image b.img)"#,
            // Two vCPUs: Linux uses no more queues than CPUs.
            r#"--cpus boot=2 --disk "path=$a,serial=first" --disk "path=$b,serial=second,num_queues=2,queue_size=128""#,
            r#"mark_image_sums vda "$a"; mark_image_sums vdb "$b"; rm -f "$a" "$b""#,
        ),
        boot_test(
            "rebind-pci",
            "blkrebind",
            r#"a=$(image a.img)"#,
            r#"--disk "path=$a""#,
            r#"rm -f "$a""#,
        ),
        boot_test(
            "rebind-mmio",
            "blkrebind",
            r#"a=$(image a.img)"#,
            r#"--disk "path=$a,transport=mmio""#,
            r#"rm -f "$a""#,
        ),
        recovery(
            "recover-managed",
            "",
            r#"--disk "path=$a""#,
            r#"kill_loop vhost-user-blk 10"#,
            "",
        ),
        recovery(
            "recover-operator",
            r#"start_op() {
                "$BIN_DIR/vhost-user-blk" --socket "$RESULTS_DIR/op.sock" --image "$a" \
                    >>"$RESULTS_DIR/op.log" 2>&1 &
                op=$!
            }
            start_op
            wait_socket "$RESULTS_DIR/op.sock"
            GUEST_ARGS="cloister.size=16M""#,
            r#"--disk "socket=$RESULTS_DIR/op.sock""#,
            r#"restart_loop 5"#,
            r#"kill -TERM "$op"; wait "$op"; mark op.rc $?"#,
        ),
        Scenario::new(
            "recover-refused",
            &format!(
                r#"{PRELUDE}
                # An operator's disk backend dies and a network backend comes up on its socket:
                # cloister refuses it (it lacks the features the guest's disk driver uses), the
                # disk stays down, and the VM runs on and stops normally.
                a=$(image a.img)
                "$BIN_DIR/vhost-user-blk" --socket "$RESULTS_DIR/op.sock" --image "$a" &
                op=$!
                wait_socket "$RESULTS_DIR/op.sock"
                cloister_bg "$RESULTS_DIR/vm.log" blkloop --disk "socket=$RESULTS_DIR/op.sock"
                wait_for "$RESULTS_DIR/console.log" "CLOISTER-BLK-LOOP pass=2" 1200 && mark loop.running yes
                kill -KILL "$op"; wait "$op" 2>/dev/null
                rm -f "$RESULTS_DIR/op.sock"
                "$BIN_DIR/vhost-user-net" --socket "$RESULTS_DIR/op.sock" --tap ctapz &
                net=$!
                wait_for "$RESULTS_DIR/vm.log" "refused" 300 && mark refused yes
                sleep 1
                running "$vm" && mark vm.alive yes
                stop_vm
                kill -TERM "$net"; wait "$net"
                echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
                rm -f "$a"
                "#
            ),
        )
        .timeout(Duration::from_secs(240)),
        perf("perf-pci", "pci"),
        perf("perf-mmio", "mmio"),
    ]
}

/// The guest writes every block of its disk with a checksum and reads them back (the
/// `blkrecover` guest test) while `kills` takes the backend away under it, again and again;
/// then the image is checked block by block on the host too. `before` starts an operator's
/// backend (`start_op`, which sets `$op`); the image is `$a`.
fn recovery(name: &str, before: &str, disk: &str, kills: &str, after: &str) -> Scenario {
    Scenario::new(
        name,
        &format!(
            r#"{PRELUDE}
            a=$(image a.img)
            show() {{ for f in "$@"; do echo "--- $f ---"; cat "$RESULTS_DIR/$f"; done; }}
            # kill_loop PROGRAM N: N times, 1 to 2 s after the last recovery (sooner looks like
            # a crash loop, which cloister slows down), SIGKILL PROGRAM (a managed backend:
            # cloister starts it again).
            kill_loop() {{
                k=0
                while [ "$k" -lt "$2" ] && running "$vm"; do
                    random_pause
                    pid=$(pidof "$1") || break
                    kill -KILL $pid
                    k=$((k + 1))
                    wait_back "$k"
                done
                mark kills "$k"
            }}
            # restart_loop N: N times, SIGKILL the operator's backend and start it again.
            restart_loop() {{
                k=0
                while [ "$k" -lt "$1" ] && running "$vm"; do
                    random_pause
                    kill -KILL "$op"; wait "$op" 2>/dev/null
                    k=$((k + 1))
                    sleep 0.2
                    start_op
                    wait_back "$k"
                done
                mark kills "$k"
            }}
            random_pause() {{
                ms=$((1000 + $(od -An -N2 -tu2 /dev/urandom) % 1000))
                sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"
            }}
            wait_back() {{
                j=0
                while [ "$(grep -c 'backend back after' "$RESULTS_DIR/vm.log")" -lt "$1" ] \
                    && [ "$j" -lt 150 ]; do
                    sleep 0.1; j=$((j + 1))
                done
            }}
            {before}
            INITRAMFS="$GUEST_DIR/initramfs-tools.cpio"
            cloister_bg "$RESULTS_DIR/vm.log" blkrecover {disk}
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-BLK-RECOVER writing" 1800; then
                mark guest.writing yes
                {kills}
                grep -q "CLOISTER-BLK-RECOVER done" "$RESULTS_DIR/console.log" || mark kills.during_io yes
            fi
            mark recoveries "$(grep -c 'backend back after' "$RESULTS_DIR/vm.log")"
            mark recovery.ms "$(grep -o 'back after [0-9]* ms' "$RESULTS_DIR/vm.log" | awk '{{printf "%s%s", s, $3; s=","}}')"
            # Bounded well inside the scenario's timeout: a guest whose I/O stalls fails this
            # scenario alone (and shows why) rather than the whole lab run.
            wait_for "$RESULTS_DIR/console.log" "CLOISTER-BLK-RECOVER done" 900
            wait_vm_exit 300
            {after}
            size=$(grep -o 'size=[0-9]*M' "$RESULTS_DIR/console.log" | head -n1 | cut -d= -f2)
            fio --name=recover --filename="$a" --rw=randwrite --bs=4k --size="$size" \
                --verify=crc32c --verify_only --verify_fatal=1 >"$RESULTS_DIR/host-verify.log" 2>&1
            mark host.verify $?
            show vm.log console.log host-verify.log
            [ -f "$RESULTS_DIR/op.log" ] && show op.log
            rm -f "$a"
            "#
        ),
    )
    .timeout(Duration::from_secs(300))
}

/// What the VMM does while the guest moves 128 MiB through the disk (2048 requests of 64 KiB):
/// KVM's own count of exits to the VMM (debugfs), the main thread's CPU time, and for scale
/// the backend's.
/// If the guest dies early (the lab's emulation has triple-faulted guests under sustained
/// I/O), the scenario stops waiting and shows cloister's log; `LAB.check` decides about a rerun.
fn perf(name: &str, transport: &str) -> Scenario {
    Scenario::new(
        name,
        &format!(
            r#"{PRELUDE}
            grep -q " /sys/kernel/debug " /proc/mounts || mount -t debugfs none /sys/kernel/debug
            # wait_vm TEXT TENTHS: wait_for on the guest console, giving up when cloister ends.
            wait_vm() {{
                j=0
                while [ "$j" -lt "$2" ]; do
                    grep -q "$1" "$RESULTS_DIR/console.log" 2>/dev/null && return 0
                    running "$vm" || return 1
                    sleep 0.1
                    j=$((j + 1))
                done
                return 1
            }}
            measure() {{
                truncate -s 300M "$RESULTS_DIR/p.img"
                cloister_bg "$RESULTS_DIR/vm.log" blkperf --disk "path=$RESULTS_DIR/p.img,transport={transport}"
                wait_vm CLOISTER-BLK-PERF-START 1200 || return 1
                kvm=$(ls -d /sys/kernel/debug/kvm/$vm-* | head -n1)
                # exits: all of them; mmio_exits and io_exits: the ones that reach the VMM.
                kstat() {{ for f in exits mmio_exits io_exits; do cat "$kvm/$f"; done; }}
                set -- $(kstat); e1=$1; m1=$2; i1=$3
                set -- $(cpu $vm); u1=$1; s1=$2; g1=$3
                set -- $(cpu $vm/task/$vm); mu1=$1; ms1=$2
                backend=$(pidof vhost-user-blk)
                set -- $(cpu $backend); bu1=$1; bs1=$2
                wait_vm CLOISTER-BLK-PERF-END 1500 || return 1
                set -- $(kstat); e2=$1; m2=$2; i2=$3
                set -- $(cpu $vm); u2=$1; s2=$2; g2=$3
                set -- $(cpu $vm/task/$vm); mu2=$1; ms2=$2
                set -- $(cpu $backend); bu2=$1; bs2=$2
            }}
            if measure; then
                mark perf.done yes
                mark kvm.exits $((e2 - e1))
                mark vmm.mmio_exits $((m2 - m1))
                mark vmm.io_exits $((i2 - i1))
                mark vmm.main_thread_ticks $((mu2 - mu1 + ms2 - ms1))
                # The whole process, vCPU threads running the guest included (guest_time is part
                # of utime, though scaled differently, so they do not subtract exactly).
                mark vmm.cpu_ticks $((u2 - u1 + s2 - s1))
                mark vmm.guest_ticks $((g2 - g1))
                mark backend.ticks $((bu2 - bu1 + bs2 - bs1))
                grep CLOISTER-BLK-PERF-END "$RESULTS_DIR/console.log"
            fi
            # It powers off by itself; SIGTERM only if it did not.
            i=0; while running $vm && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
            stop_vm
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            rm -f "$RESULTS_DIR/p.img"
            "#
        ),
    )
    .timeout(Duration::from_secs(400))
}

/// The guest ran `blk` and powered off; cloister exited 0.
fn powered_off(outcome: &ScenarioOutcome) -> &ScenarioOutcome {
    outcome
        .expect_mark("vm.rc", "0")
        .expect_console("CLOISTER-GUEST-RESULT test=blk rc=0")
        .expect_no_console("CLOISTER-BLK-ERROR")
        .expect_no_console("CLOISTER-BLK-NONE")
        .expect_no_console("panicked");
    outcome
}

fn field<'a>(outcome: &'a ScenarioOutcome, tag: &str, key: &str) -> &'a str {
    outcome
        .field(tag, key)
        .unwrap_or_else(|| outcome.fail(&format!("no {key}= on the guest's {tag} line")))
}

/// The guest sees `dev` with these properties.
fn expect_disk(outcome: &ScenarioOutcome, dev: &str, props: &[(&str, &str)]) {
    let tag = format!("CLOISTER-BLK-{dev} ");
    for (key, want) in props {
        let got = field(outcome, &tag, key);
        if got != *want {
            outcome.fail(&format!("{dev}: {key}={got}, expected {want}"));
        }
    }
}

/// What the guest wrote to `dev` it read back, and it is in the image file on the host.
fn expect_round_trip(outcome: &ScenarioOutcome, dev: &str) {
    for off in OFFSETS {
        let tag = format!("CLOISTER-BLK-DATA-{dev}-{off} ");
        let written = field(outcome, &tag, "written");
        let read = field(outcome, &tag, "read");
        if written != read {
            outcome.fail(&format!(
                "{dev} at {off} MiB: read back {read}, wrote {written}"
            ));
        }
        let on_host = outcome.mark(&format!("img.{dev}.{off}"));
        if on_host != Some(written) {
            outcome.fail(&format!(
                "{dev} at {off} MiB: the image holds {on_host:?}, the guest wrote {written}"
            ));
        }
    }
}

#[test]
fn managed_disk_over_pci() {
    LAB.check("pci-managed", |o| {
        powered_off(o);
        expect_disk(
            o,
            "vda",
            &[
                ("sectors", "131072"),
                ("ro", "0"),
                ("queues", "1"),
                ("bus", "pci"),
            ],
        );
        expect_round_trip(o, "vda");
    });
}

#[test]
fn managed_disk_over_mmio() {
    LAB.check("mmio-managed", |o| {
        powered_off(o);
        expect_disk(
            o,
            "vda",
            &[("sectors", "131072"), ("ro", "0"), ("bus", "mmio")],
        );
        expect_round_trip(o, "vda");
    });
}

#[test]
fn operator_launched_backend() {
    LAB.check("operator-socket", |o| {
        powered_off(o);
        expect_disk(
            o,
            "vda",
            &[("sectors", "131072"), ("queues", "1"), ("bus", "pci")],
        );
        expect_round_trip(o, "vda");
        o.expect_mark("backend.alive", "yes");
        o.expect_mark("backend.rc", "0");
    });
}

#[test]
fn readonly_disk_refuses_writes_and_stays_unchanged() {
    LAB.check("readonly", |o| {
        powered_off(o);
        expect_disk(o, "vda", &[("ro", "1")]);
        if field(o, "CLOISTER-BLK-ROWRITE-vda ", "rc") == "0" {
            o.fail("a write to the read-only disk succeeded");
        }
        let head = o.mark("img.head");
        if head.is_none() || o.field("CLOISTER-BLK-READ-vda ", "sha256") != head {
            o.fail("the guest did not read the image's first 2 MiB");
        }
        if o.mark("img.before").is_none() || o.mark("img.before") != o.mark("img.after") {
            o.fail("the read-only image changed");
        }
    });
}

#[test]
fn four_queues_reach_the_guest() {
    LAB.check("four-queues", |o| {
        powered_off(o);
        expect_disk(o, "vda", &[("queues", "4"), ("bus", "pci")]);
        expect_round_trip(o, "vda");
    });
}

#[test]
fn two_disks_in_order() {
    LAB.check("two-disks", |o| {
        powered_off(o);
        expect_disk(o, "vda", &[("serial", "first"), ("queues", "1")]);
        expect_disk(o, "vdb", &[("serial", "second"), ("queues", "2")]);
        expect_round_trip(o, "vda");
        expect_round_trip(o, "vdb");
    });
}

/// A driver unbound and bound again resets the device and starts it again, twice: the rings
/// go back to the backend each time and the data is still there.
#[test]
fn device_reset_and_reactivation() {
    for name in ["rebind-pci", "rebind-mmio"] {
        LAB.check(name, |o| {
            o.expect_mark("vm.rc", "0")
                .expect_console("CLOISTER-GUEST-RESULT test=blkrebind rc=0")
                .expect_no_console("CLOISTER-BLK-ERROR")
                .expect_no_console("cannot start the device");
            for round in 1..=2 {
                let tag = format!("CLOISTER-BLK-REBIND-{round} ");
                let written = field(o, &tag, "written");
                if field(o, &tag, "read") != written {
                    o.fail(&format!("round {round}: data changed across the reset"));
                }
            }
        });
    }
}

/// What every recovery scenario shows: the guest wrote and read back every block with no
/// I/O error while its backend was taken away `kills` times, each time it came back, and the
/// image checks out block by block on the host.
fn expect_recovered(o: &ScenarioOutcome, kills: u64, vm_rc: &str) {
    o.expect_mark("guest.writing", "yes")
        .expect_mark("kills.during_io", "yes")
        .expect_mark("host.verify", "0")
        .expect_mark("vm.rc", vm_rc)
        .expect_console("CLOISTER-BLK-RECOVER done rc=0 io_errors=0")
        .expect_console("CLOISTER-GUEST-RESULT test=blkrecover rc=0")
        .expect_no_console("panicked");
    if o.mark_u64("kills") != kills || o.mark_u64("recoveries") != kills {
        o.fail(&format!(
            "{} kills, {} recoveries; {kills} of each expected",
            o.mark_u64("kills"),
            o.mark_u64("recoveries")
        ));
    }
    eprintln!(
        "recovery times (ms): {}",
        o.mark("recovery.ms").unwrap_or("none")
    );
}

#[test]
fn a_managed_disk_backend_killed_ten_times_loses_no_write() {
    LAB.check("recover-managed", |o| {
        expect_recovered(o, 10, "0");
        o.expect_console(
            "backend exited with signal 9 (SIGKILL); waiting for the backend to come back",
        );
    });
}

#[test]
fn an_operator_disk_backend_restarted_under_load_loses_no_write() {
    LAB.check("recover-operator", |o| {
        expect_recovered(o, 5, "0");
        o.expect_mark("op.rc", "0")
            .expect_console("backend disconnected; waiting for the backend to come back");
    });
}

#[test]
fn a_backend_that_comes_back_as_something_else_is_refused_and_the_vm_runs_on() {
    LAB.check("recover-refused", |o| {
        o.expect_mark("loop.running", "yes")
            .expect_mark("refused", "yes")
            .expect_mark("vm.alive", "yes")
            .expect_mark("vm.rc", "143")
            .expect_console("the backend came back but is refused")
            .expect_console("lacks features the driver uses")
            .expect_no_console("panicked");
    });
}

/// The VMM must do no work per I/O. Over the 2048 requests (plus the guest's own console
/// output, a few dozen port writes): with PCI and MSI-X, notifications are ioeventfds and
/// completions irqfds, so KVM hands almost nothing to the VMM; with virtio-mmio the guest's
/// interrupt handler reads InterruptStatus and writes InterruptACK, two MMIO exits per
/// interrupt, answered from memory. The main thread sleeps throughout.
#[test]
fn vmm_stays_out_of_the_io_path() {
    for name in ["perf-pci", "perf-mmio"] {
        LAB.check(name, |o| expect_out_of_the_io_path(name, o));
    }
}

fn expect_out_of_the_io_path(name: &str, o: &ScenarioOutcome) {
    o.expect_mark("perf.done", "yes");
    let main = o.mark_u64("vmm.main_thread_ticks");
    eprintln!(
        "{name}: KVM exits {}, to the VMM: {} MMIO + {} port I/O; main thread {main} ticks; \
         process {} ticks of which guest {}; backend {} ticks",
        o.mark_u64("kvm.exits"),
        o.mark_u64("vmm.mmio_exits"),
        o.mark_u64("vmm.io_exits"),
        o.mark_u64("vmm.cpu_ticks"),
        o.mark_u64("vmm.guest_ticks"),
        o.mark_u64("backend.ticks"),
    );
    if main > 5 {
        o.fail(&format!(
            "the main thread used {main} ticks during guest I/O"
        ));
    }
    let mmio = o.mark_u64("vmm.mmio_exits");
    if name == "perf-pci" && mmio > 100 {
        o.fail(&format!(
            "{mmio} MMIO exits reached the VMM during 2048 requests"
        ));
    }
}
