//! Every device kind out of process, with the stock guest in the lab: virtio-fs shares (the
//! Rust virtiofsd cloister starts, and the Rust and C virtiofsd run by the operator), the
//! entropy device, vsock both ways, generic vhost-user devices (rust-vmm's rng and vsock
//! backends), all of them in one VM over PCI and over MMIO, a ring size a backend refuses, and
//! a share whose daemon dies under the guest.

use std::time::Duration;

use harness::{LabOptions, Scenario, ScenarioOutcome, SharedRun};

static LAB: SharedRun = SharedRun::new("devices", scenarios, LabOptions::default);

/// `moded`'s time on the host (2023-11-14 22:13:20 UTC) and what the guest gives `guest-mode`
/// (2001-02-03 04:05:06 UTC).
const HOST_MTIME: &str = "1700000000";
const GUEST_MTIME: &str = "981173106";

/// Shell helpers every scenario gets.
const PRELUDE: &str = r#"
# share_dir NAME: a directory with what the guest's share test reads; prints its path.
share_dir() {
    d="$RESULTS_DIR/$1"
    mkdir -p "$d"
    seq 1 5000 >"$d/from-host"
    dd if=/dev/urandom of="$d/big" bs=1M count=64 2>/dev/null
    echo moded >"$d/moded"
    chmod 640 "$d/moded"
    touch -d '2023-11-14 22:13:20' "$d/moded"
    echo renamed-content >"$d/to-rename"
    echo bye >"$d/to-delete"
    cp "$BIN_DIR/vsock-probe" "$d/"
    echo "$d"
}
# share_marks NAME DIR: what the host sees in DIR after the guest's share test.
share_marks() {
    d=$2
    mark "$1.from_host" "$(sha256sum <"$d/from-host" | cut -d' ' -f1)"
    mark "$1.big" "$(sha256sum <"$d/big" | cut -d' ' -f1)"
    if [ -f "$d/from-guest" ]; then
        mark "$1.from_guest" "$(sha256sum <"$d/from-guest" | cut -d' ' -f1)"
    fi
    if [ -f "$d/renamed" ] && [ ! -e "$d/to-rename" ]; then mark "$1.renamed" yes; fi
    if [ ! -e "$d/to-delete" ]; then mark "$1.deleted" yes; fi
    mark "$1.guest_dir" "$(cat "$d/guest-dir/file" 2>/dev/null)"
    mark "$1.guest_mode" "$(stat -c '%a-%Y' "$d/guest-mode" 2>/dev/null)"
    if [ -e "$d/should-fail" ]; then mark "$1.ro_file" present; fi
}
# vm_share TEST SHARES ARGS...: boots the guest's TEST in the foreground with cloister.shares.
vm_share() {
    t=$1
    shares=$2
    shift 2
    run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
        --initramfs "$GUEST_DIR/initramfs.cpio" \
        --cmdline "$(guest_cmdline "$t" cloister.shares="$shares")" "$@"
}
# host_vsock_serve PATH: answers one guest connection to the host port PATH names.
host_vsock_serve() {
    "$BIN_DIR/vsock-probe" host-serve "$1" >"$RESULTS_DIR/host-serve.out" 2>&1 &
    wait_socket "$1"
}
# vsock_marks: what the host's side of the vsock test saw.
vsock_marks() {
    mark host.got "$(sed -n 's/^host-serve: got //p' "$RESULTS_DIR/host-serve.out")"
}
"#;

fn scenario(name: &str, body: &str) -> Scenario {
    Scenario::new(name, &format!("{PRELUDE}\n{body}")).timeout(Duration::from_secs(300))
}

/// Two shares and a disk, a share, an rng and a vsock device: the guest's tools (vsock-probe)
/// come in the share and need the initramfs with the runtime libraries.
fn all_devices(name: &str, transport: &str) -> Scenario {
    scenario(
        name,
        &format!(
            r#"
            tools=$(share_dir tools)
            truncate -s 64M "$RESULTS_DIR/d.img"
            host_vsock_serve "$RESULTS_DIR/v.sock_5678"
            INITRAMFS="$GUEST_DIR/initramfs-tools.cpio"
            cloister_bg "$RESULTS_DIR/vm.log" alldevices \
                --disk "path=$RESULTS_DIR/d.img,transport={transport}" \
                --fs "tag=tools,path=$tools,transport={transport}" \
                --rng "src=/dev/urandom,transport={transport}" \
                --vsock "cid=3,socket=$RESULTS_DIR/v.sock,transport={transport}"
            wait_vm_exit 1800
            vsock_marks
            mark from_host "$(sha256sum <"$tools/from-host" | cut -d' ' -f1)"
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            echo "--- guest ---"; cat "$RESULTS_DIR/console.log"
            rm -rf "$tools" "$RESULTS_DIR/d.img"
            "#
        ),
    )
}

fn scenarios() -> Vec<Scenario> {
    vec![
        scenario(
            "fs-managed",
            r#"
            a=$(share_dir rw)
            b=$(share_dir ro)
            vm_share share rw,ro:ro --fs "tag=rw,path=$a" --fs "tag=ro,path=$b,readonly=on"
            share_marks rw "$a"
            share_marks ro "$b"
            rm -rf "$a" "$b"
            "#,
        ),
        scenario(
            "fs-operator-rust",
            r#"
            a=$(share_dir rw)
            virtiofsd --socket-path="$RESULTS_DIR/fs.sock" --shared-dir="$a" \
                >"$RESULTS_DIR/virtiofsd.log" 2>&1 &
            wait_socket "$RESULTS_DIR/fs.sock" || cat "$RESULTS_DIR/virtiofsd.log"
            vm_share share rw --fs "tag=rw,socket=$RESULTS_DIR/fs.sock"
            share_marks rw "$a"
            rm -rf "$a"
            "#,
        ),
        scenario(
            "fs-operator-c",
            r#"
            a=$(share_dir rw)
            /usr/lib/qemu/virtiofsd --socket-path="$RESULTS_DIR/fs.sock" -o source="$a" \
                -o cache=auto >"$RESULTS_DIR/virtiofsd.log" 2>&1 &
            wait_socket "$RESULTS_DIR/fs.sock" || cat "$RESULTS_DIR/virtiofsd.log"
            vm_share share rw --fs "tag=rw,socket=$RESULTS_DIR/fs.sock"
            share_marks rw "$a"
            rm -rf "$a"
            "#,
        ),
        scenario(
            "rng",
            r#"
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
                --initramfs "$GUEST_DIR/initramfs.cpio" --cmdline "$(guest_cmdline rng)" \
                --rng src=/dev/urandom
            "#,
        ),
        scenario(
            "vsock",
            r#"
            tools=$(share_dir tools)
            host_vsock_serve "$RESULTS_DIR/v.sock_5678"
            INITRAMFS="$GUEST_DIR/initramfs-tools.cpio"
            cloister_bg "$RESULTS_DIR/vm.log" vsock --fs "tag=tools,path=$tools" \
                --vsock "cid=3,socket=$RESULTS_DIR/v.sock"
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-VSOCK listening" 1200; then
                "$BIN_DIR/vsock-probe" host-connect "$RESULTS_DIR/v.sock" 1234 from-host \
                    >"$RESULTS_DIR/host-connect.out" 2>&1
                mark host.connect "$(sed -n 's/^host-connect: //p' "$RESULTS_DIR/host-connect.out")"
                cat "$RESULTS_DIR/host-connect.out"
            fi
            wait_vm_exit 600
            vsock_marks
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            echo "--- guest ---"; cat "$RESULTS_DIR/console.log"
            rm -rf "$tools"
            "#,
        ),
        all_devices("all-pci", "pci"),
        all_devices("all-mmio", "mmio"),
        // rust-vmm's backends run by the operator, driven as generic vhost-user devices.
        scenario(
            "generic",
            r#"
            tools=$(share_dir tools)
            truncate -s 64M "$RESULTS_DIR/d.img"
            vhost-device-rng --socket-path="$RESULTS_DIR/rng.sock" >"$RESULTS_DIR/rng.log" 2>&1 &
            vhost-device-vsock --guest-cid=3 --socket="$RESULTS_DIR/vsock.sock" \
                --uds-path="$RESULTS_DIR/v.sock" >"$RESULTS_DIR/vsock.log" 2>&1 &
            wait_socket "$RESULTS_DIR/rng.sock0" || cat "$RESULTS_DIR/rng.log"
            wait_socket "$RESULTS_DIR/vsock.sock" || cat "$RESULTS_DIR/vsock.log"
            host_vsock_serve "$RESULTS_DIR/v.sock_5678"
            INITRAMFS="$GUEST_DIR/initramfs-tools.cpio"
            cloister_bg "$RESULTS_DIR/vm.log" alldevices \
                --disk "path=$RESULTS_DIR/d.img" --fs "tag=tools,path=$tools" \
                --generic-vhost-user "device_type=rng,socket=$RESULTS_DIR/rng.sock0,queue_sizes=[1024]" \
                --generic-vhost-user "device_type=vsock,socket=$RESULTS_DIR/vsock.sock,queue_sizes=[256,256,256],id=vs"
            wait_vm_exit 1800
            vsock_marks
            mark from_host "$(sha256sum <"$tools/from-host" | cut -d' ' -f1)"
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            echo "--- guest ---"; cat "$RESULTS_DIR/console.log"
            rm -rf "$tools" "$RESULTS_DIR/d.img"
            "#,
        ),
        // rust-vmm's console backend (its network mode: the guest's console reaches a TCP
        // client on the lab host) as a generic device with four queues.
        scenario(
            "console",
            r#"
            vhost-device-console --socket-path="$RESULTS_DIR/con.sock" --backend network \
                --tcp-port 12345 >"$RESULTS_DIR/console-backend.log" 2>&1 &
            backend=$!
            wait_socket "$RESULTS_DIR/con.sock0" || cat "$RESULTS_DIR/console-backend.log"
            nc 127.0.0.1 12345 >"$RESULTS_DIR/from-guest.txt" 2>&1 &
            client=$!
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
                --initramfs "$GUEST_DIR/initramfs.cpio" --cmdline "$(guest_cmdline console)" \
                --generic-vhost-user "device_type=console,socket=$RESULTS_DIR/con.sock0,queue_sizes=[128,128,128,128]"
            sleep 1
            mark host.got "$(tr -d '\r' <"$RESULTS_DIR/from-guest.txt" | head -n1)"
            kill "$client" "$backend" 2>/dev/null
            "#,
        ),
        // A backend that accepts rings of at most 128 entries, offered 256: the start fails
        // with a message that names the fix, and the VM goes on and stops normally.
        scenario(
            "ring-refused",
            r#"
            vhost-device-vsock --guest-cid=3 --socket="$RESULTS_DIR/vsock.sock" \
                --uds-path="$RESULTS_DIR/v.sock" --queue-size=128 >"$RESULTS_DIR/vsock.log" 2>&1 &
            wait_socket "$RESULTS_DIR/vsock.sock" || cat "$RESULTS_DIR/vsock.log"
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
                --initramfs "$GUEST_DIR/initramfs.cpio" --cmdline "$(guest_cmdline info)" \
                --generic-vhost-user "device_type=vsock,socket=$RESULTS_DIR/vsock.sock,queue_sizes=[256,256,256]"
            "#,
        ),
        // The managed virtiofsd is killed while the guest uses the share: cloister says so,
        // keeps running, and stops on SIGTERM.
        scenario(
            "fs-daemon-dies",
            r#"
            a=$(share_dir rw)
            cloister_bg "$RESULTS_DIR/vm.log" fsloop --fs "tag=rw,path=$a"
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-FSLOOP pass=3" 1200; then
                mark loop.running yes
            fi
            daemon=$(pidof virtiofsd)
            mark daemon.found "${daemon:+yes}"
            kill -KILL $daemon
            wait_for "$RESULTS_DIR/vm.log" "backend exited" 300 && mark reported yes
            sleep 1
            running "$vm" && mark vm.alive yes
            stop_vm
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            rm -rf "$a"
            "#,
        ),
        scenario(
            "api-hotplug",
            r#"
            # The orchestrator's way: cloister with an API socket, a disk hot-plugged by path
            # while the guest runs (the guest scans the slot ACPI names), then removed (the
            # guest lets go and ejects it), then the power button.
            api="$RESULTS_DIR/api.sock"
            remote() { "$BIN_DIR/cloister-remote" --api-socket "$api" "$@"; }
            truncate -s 64M "$RESULTS_DIR/hot.img"
            cloister_bg "$RESULTS_DIR/vm.log" hotplug --api-socket "$api"
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-HOTPLUG ready" 1200; then
                remote add-disk "path=$RESULTS_DIR/hot.img,id=hot" >"$RESULTS_DIR/add.json"
                mark add.rc $?
                mark add.reply "$(tr -d ' \n' <"$RESULTS_DIR/add.json")"
            fi
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-HOTPLUG added=" 1200; then
                mark host.sum "$(dd if="$RESULTS_DIR/hot.img" bs=1M count=2 2>/dev/null                     | sha256sum | cut -d' ' -f1)"
                remote remove-device hot
                mark remove.rc $?
            fi
            if wait_for "$RESULTS_DIR/vm.log" "ejected by the guest; removed" 1200; then
                mark ejected yes
                remote info | grep -q '"hot"' || mark gone yes
            fi
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-HOTPLUG button-ready" 600; then
                remote power-button
                mark button.rc $?
            fi
            wait_vm_exit 1200
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            echo "--- guest ---"; cat "$RESULTS_DIR/console.log"
            rm -f "$RESULTS_DIR/hot.img"
            "#,
        ),
        scenario(
            "api-pause",
            r#"
            # A pause under disk and network load: while paused, the guest's memory does not
            # change (vCPUs parked, rings stopped) and the tap hears nothing; resumed, both
            # loads go on and the disk holds what the guest wrote.
            api="$RESULTS_DIR/api.sock"
            remote() { "$BIN_DIR/cloister-remote" --api-socket "$api" "$@"; }
            truncate -s 64M "$RESULTS_DIR/d.img"
            GUEST_ARGS="cloister.hold=40"
            cloister_bg "$RESULTS_DIR/vm.log" pauseload --api-socket "$api" --memory size=256M                 --disk "path=$RESULTS_DIR/d.img"                 --net "tap=cptap0,ip=10.10.9.1,mask=255.255.255.0"
            if wait_for "$RESULTS_DIR/console.log" "CLOISTER-PAUSE loaded" 3000; then
                sleep 2
                remote pause
                mark pause.rc $?
                mark state "$(remote info | grep -o '"state": *"[A-Za-z]*"' | tr -d ' "' )"
                rx1=$(cat /sys/class/net/cptap0/statistics/rx_packets)
                m1=$("$BIN_DIR/guest-mem" "$vm")
                sleep 3
                m2=$("$BIN_DIR/guest-mem" "$vm")
                rx2=$(cat /sys/class/net/cptap0/statistics/rx_packets)
                echo "paused memory: $m1 then $m2; tap rx $rx1 then $rx2"
                [ -n "$m1" ] && [ "$m1" = "$m2" ] && mark mem.same yes
                [ "$rx1" = "$rx2" ] && mark tap.quiet yes
                remote resume
                mark resume.rc $?
                sleep 3
                m3=$("$BIN_DIR/guest-mem" "$vm")
                [ "$m3" != "$m2" ] && mark mem.moves yes
            fi
            wait_vm_exit 3000
            echo "--- cloister ---"; cat "$RESULTS_DIR/vm.log"
            echo "--- guest ---"; cat "$RESULTS_DIR/console.log"
            rm -f "$RESULTS_DIR/d.img"
            "#,
        ),
    ]
}

fn field<'a>(o: &'a ScenarioOutcome, tag: &str, key: &str) -> &'a str {
    o.field(tag, key)
        .unwrap_or_else(|| o.fail(&format!("no {key}= on the guest's {tag} line")))
}

fn expect_field(o: &ScenarioOutcome, tag: &str, key: &str, want: &str) {
    let got = field(o, tag, key);
    if got != want {
        o.fail(&format!("{tag}{key}={got}, expected {want}"));
    }
}

/// The guest's share test on the writable share `tag`, and what the host saw after it.
fn expect_writable_share(o: &ScenarioOutcome, tag: &str) {
    let line = format!("CLOISTER-SHARE-{tag} ");
    expect_field(o, &line, "mount", "ok");
    let mark = |k: &str| {
        o.mark(&format!("{tag}.{k}"))
            .unwrap_or_else(|| o.fail(&format!("no mark {tag}.{k}")))
            .to_string()
    };
    expect_field(o, &line, "from_host", &mark("from_host"));
    expect_field(o, &line, "big", &mark("big"));
    expect_field(o, &line, "from_guest", &mark("from_guest"));
    expect_field(o, &line, "mode", "640");
    expect_field(o, &line, "mtime", HOST_MTIME);
    expect_field(o, &line, "renamed", "renamed-content");
    expect_field(o, &line, "deleted", "yes");
    o.expect_mark(&format!("{tag}.renamed"), "yes")
        .expect_mark(&format!("{tag}.deleted"), "yes")
        .expect_mark(&format!("{tag}.guest_dir"), "inside")
        .expect_mark(&format!("{tag}.guest_mode"), &format!("604-{GUEST_MTIME}"));
}

#[test]
fn managed_shares_read_write_and_read_only() {
    LAB.check("fs-managed", |o| {
        o.expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=share rc=0");
        expect_writable_share(o, "rw");
        let ro = "CLOISTER-SHARE-ro ";
        expect_field(o, ro, "mount", "ok");
        expect_field(o, ro, "ro_write", "refused");
        expect_field(o, ro, "big", o.mark("ro.big").unwrap_or("?"));
        if o.mark("ro.ro_file").is_some() {
            o.fail("a file appeared in the read-only share");
        }
    });
}

#[test]
fn operator_launched_rust_and_c_virtiofsd() {
    for name in ["fs-operator-rust", "fs-operator-c"] {
        LAB.check(name, |o| {
            o.expect_mark("vm.rc", "0")
                .expect_console("CLOISTER-GUEST-RESULT test=share rc=0");
            expect_writable_share(o, "rw");
        });
    }
}

#[test]
fn entropy_device_feeds_hwrng() {
    LAB.check("rng", |o| {
        o.expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=rng rc=0");
        let line = "CLOISTER-RNG ";
        if !field(o, line, "current").starts_with("virtio_rng") {
            o.fail("the kernel's hwrng is not virtio");
        }
        expect_field(o, line, "bytes", "64");
    });
}

#[test]
fn vsock_both_ways() {
    LAB.check("vsock", |o| {
        o.expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=vsock rc=0")
            // The guest reached the host's port 5678 and got the host's answer...
            .expect_mark("host.got", "from-guest");
        expect_field(o, "CLOISTER-VSOCK ", "guest_connect", "echo:from-guest");
        // ...and the host reached the guest's port 1234.
        o.expect_mark("host.connect", "echo:from-host");
        expect_field(o, "CLOISTER-VSOCK ", "guest_serve", "from-host");
    });
}

fn expect_all_devices(o: &ScenarioOutcome, test: &str) {
    o.expect_mark("vm.rc", "0")
        .expect_console(&format!("CLOISTER-GUEST-RESULT test={test} rc=0"))
        .expect_mark("host.got", "from-guest");
    let line = "CLOISTER-ALL ";
    expect_field(o, line, "disk", "ok");
    expect_field(o, line, "share", o.mark("from_host").unwrap_or("?"));
    expect_field(o, line, "vsock", "echo:from-guest");
    expect_field(o, "CLOISTER-RNG ", "bytes", "64");
}

#[test]
fn a_disk_a_share_an_rng_and_a_vsock_device_over_pci_and_mmio() {
    for name in ["all-pci", "all-mmio"] {
        LAB.check(name, |o| expect_all_devices(o, "alldevices"));
    }
}

#[test]
fn generic_vhost_user_devices_from_rust_vmm() {
    LAB.check("generic", |o| expect_all_devices(o, "alldevices"));
}

#[test]
fn rust_vmm_console_backend_as_a_generic_device() {
    LAB.check("console", |o| {
        o.expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=console rc=0")
            .expect_console("CLOISTER-CONSOLE hvc0=written")
            .expect_mark("host.got", "hello-from-hvc0");
    });
}

#[test]
fn a_refused_ring_size_names_the_fix() {
    LAB.check("ring-refused", |o| {
        o.expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=info rc=0")
            .expect_console("a ring of 256 entries")
            .expect_console(
                "set queue_size= (queue_sizes= for --generic-vhost-user) to a size it accepts",
            )
            .expect_no_console("panicked");
    });
}

#[test]
fn a_share_whose_daemon_dies_is_reported() {
    LAB.check("fs-daemon-dies", |o| {
        o.expect_mark("loop.running", "yes")
            .expect_mark("daemon.found", "yes")
            .expect_mark("reported", "yes")
            .expect_mark("vm.alive", "yes")
            .expect_mark("vm.rc", "143")
            .expect_console("backend exited with signal 9 (SIGKILL)")
            .expect_no_console("panicked");
    });
}

/// A disk added through the API appears in the stock guest (ACPI hot-plug: acpiphp scans the
/// slot the GED event names), takes data that lands in its image, and goes when removed (the
/// guest ejects it and cloister takes it out); the power button reaches the guest's driver.
#[test]
fn an_api_hot_plugged_disk_appears_works_and_is_ejected() {
    LAB.check("api-hotplug", |o| {
        o.expect_mark("add.rc", "0")
            .expect_mark("remove.rc", "0")
            .expect_mark("ejected", "yes")
            .expect_mark("gone", "yes")
            .expect_mark("button.rc", "0")
            .expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-HOTPLUG removed=vda")
            .expect_console("CLOISTER-HOTPLUG button=pressed")
            .expect_console("CLOISTER-GUEST-RESULT test=hotplug rc=0")
            .expect_no_console("panicked");
        let reply = o.mark("add.reply").unwrap_or_default();
        if !reply.contains("\"id\":\"hot\"") || !reply.contains("\"bdf\":\"0000:00:") {
            o.fail(&format!("add-disk replied {reply}"));
        }
        let added = "CLOISTER-HOTPLUG added=vda ";
        let written = field(o, added, "written");
        expect_field(o, added, "read", written);
        if o.mark("host.sum") != Some(written) {
            o.fail("the image on the host lacks what the guest wrote to the hot-plugged disk");
        }
    });
}

/// A pause under disk and network load stops everything that writes guest memory (the vCPUs
/// and the backends) and the NIC's traffic; the resumed guest goes on, and its disk holds what
/// it wrote.
#[test]
fn a_vm_paused_under_load_changes_nothing_until_resumed() {
    LAB.check("api-pause", |o| {
        o.expect_mark("pause.rc", "0")
            .expect_mark("state", "state:Paused")
            .expect_mark("mem.same", "yes")
            .expect_mark("tap.quiet", "yes")
            .expect_mark("resume.rc", "0")
            .expect_mark("mem.moves", "yes")
            .expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=pauseload rc=0")
            .expect_no_console("panicked");
        let done = "CLOISTER-PAUSE done ";
        let written = field(o, done, "written");
        expect_field(o, done, "read", written);
    });
}
