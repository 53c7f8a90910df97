//! Networking with the stock guest in the lab, all in one lab boot: a managed NIC on a tap
//! (ping, 100 MiB each way with checksums over TCP opened from either side, iperf3 both ways,
//! two queue pairs both used, offloads negotiated and large segments reaching the tap), jumbo
//! frames and two NICs, two guests on a bridge, a backend killed under a running guest, an
//! operator-launched backend, cloister in server mode with our backend as the client, and QEMU
//! driving our vhost-user-net.

use std::time::Duration;

use harness::{LabOptions, Scenario, ScenarioOutcome, SharedRun};

static LAB: SharedRun = SharedRun::new("network", scenarios, LabOptions::default);

/// Shell helpers every scenario gets.
const PRELUDE: &str = r#"
# vm_net LOG NAME CMDLINE-EXTRA ARGS...: cloister in the background running the guest's
# network test with its console in $RESULTS_DIR/NAME.console; sets $vm.
vm_net() {
    log=$1
    name=$2
    extra=$3
    shift 3
    "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
        --initramfs "${INITRAMFS:-$GUEST_DIR/initramfs.cpio}" \
        --cmdline "$(guest_cmdline netcheck $extra)" \
        --serial "file=$RESULTS_DIR/$name.console" "$@" >"$log" 2>&1 &
    vm=$!
}
# wait_link NAME [ADDR]: until the interface exists (the spawner makes a VM's tap) and, with
# ADDR, has that address; 20 s at most.
wait_link() {
    i=0
    until ip addr show dev "$1" 2>/dev/null | grep -q "${2:-mtu}"; do
        [ "$i" -lt 200 ] || return 1
        sleep 0.1
        i=$((i + 1))
    done
}
# wait_guest FILE TEXT TENTHS: wait_for, but no longer than the VM lives.
wait_guest() {
    i=0
    while [ "$i" -lt "$3" ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        running "$vm" || return 1
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}
# show NAME...: the consoles and logs, into the test's output.
show() {
    for f in "$@"; do echo "--- $f ---"; cat "$RESULTS_DIR/$f" 2>/dev/null; done
}
"#;

fn scenario(name: &str, body: &str) -> Scenario {
    Scenario::new(name, &format!("{PRELUDE}\n{body}")).timeout(Duration::from_secs(420))
}

fn scenarios() -> Vec<Scenario> {
    vec![
        scenario(
            "managed",
            r#"
            mkdir -p /tmp/www
            dd if=/dev/urandom of=/tmp/www/big bs=1M count=100 2>/dev/null
            mark host.big "$(sha256sum </tmp/www/big | cut -d' ' -f1)"
            INITRAMFS="$GUEST_DIR/initramfs-tools.cpio"
            vm_net "$RESULTS_DIR/vm.log" guest \
                "cloister.nets=10.10.0.2/24@10.10.0.1 cloister.big=1 cloister.iperf=3 cloister.streams=4" \
                --cpus boot=2 --memory size=1G \
                --net "tap=ctap0,ip=10.10.0.1,mask=255.255.255.0,num_queues=4,id=nic0"
            wait_link ctap0 10.10.0.1 && mark tap.made yes
            # httpd binds once the tap has its address.
            busybox httpd -f -p 10.10.0.1:8080 -h /tmp/www &
            httpd=$!
            iperf3 -s -D -B 10.10.0.1
            if wait_guest "$RESULTS_DIR/guest.console" "CLOISTER-NET serving" 3000; then
                mark guest.big "$(wget -q -O - http://10.10.0.2:8080/big | sha256sum | cut -d' ' -f1)"
                touch /tmp/www/fetched
            fi
            # The guest's uploads (its 100 MiB, then iperf3): its frames, as the tap got them,
            # counted before the tap goes with the VM.
            wait_guest "$RESULTS_DIR/guest.console" "iperf_up=" 3000
            mark tap.rx_bytes "$(cat /sys/class/net/ctap0/statistics/rx_bytes 2>/dev/null)"
            mark tap.rx_packets "$(cat /sys/class/net/ctap0/statistics/rx_packets 2>/dev/null)"
            wait_vm_exit 3000
            ip link show ctap0 >/dev/null 2>&1 || mark tap.gone yes
            show vm.log guest.console
            rm -rf /tmp/www
            kill $(pidof iperf3) "$httpd" 2>/dev/null
            "#,
        ),
        scenario(
            "jumbo-two-nics",
            r#"
            vm_net "$RESULTS_DIR/vm.log" guest \
                "cloister.nets=10.11.0.2/24@10.11.0.1,10.12.0.2/24@10.12.0.1 cloister.pingsize=8000" \
                --net "tap=ctap1,ip=10.11.0.1,mask=255.255.255.0,mtu=9000" \
                --net "tap=ctap2,ip=10.12.0.1,mask=255.255.255.0,mac=02:12:00:00:00:02"
            wait_vm_exit 3000
            show vm.log guest.console
            "#,
        ),
        scenario(
            "two-guests",
            r#"
            ip link add cbr0 type bridge
            ip link set cbr0 up
            vm_net "$RESULTS_DIR/a.log" a "cloister.nets=10.20.0.2/24@10.20.0.3 cloister.hold=5" \
                --memory size=256M --net "tap=ctapa"
            a=$vm
            vm_net "$RESULTS_DIR/b.log" b "cloister.nets=10.20.0.3/24@10.20.0.2 cloister.hold=5" \
                --memory size=256M --net "tap=ctapb"
            b=$vm
            wait_link ctapa && ip link set ctapa master cbr0
            wait_link ctapb && ip link set ctapb master cbr0
            vm=$a; wait_vm_exit 3000
            vm=$b; wait_vm_exit 3000
            show a.log a.console b.log b.console
            ip link del cbr0
            "#,
        ),
        scenario(
            "backend-killed",
            r#"
            # The managed backend is killed three times: while the guest downloads 100 MiB,
            # while the host downloads the guest's 100 MiB, and under a ping flood. Each time
            # cloister starts it again (the tap made again with its name and address) and the
            # traffic goes on: both checksums match and the pings resume.
            mkdir -p /tmp/www
            dd if=/dev/urandom of=/tmp/www/big bs=1M count=100 2>/dev/null
            mark host.big "$(sha256sum </tmp/www/big | cut -d' ' -f1)"
            INITRAMFS="$GUEST_DIR/initramfs-tools.cpio"
            vm_net "$RESULTS_DIR/vm.log" guest "cloister.nets=10.14.0.2/24@10.14.0.1 cloister.big=1 cloister.hold=15" \
                --memory size=1G --net "tap=ctap4,ip=10.14.0.1,mask=255.255.255.0"
            wait_link ctap4 10.14.0.1
            busybox httpd -f -p 10.14.0.1:8080 -h /tmp/www &
            httpd=$!
            kills=0
            # kill_backend: SIGKILL the NIC's backend, then until cloister has it back.
            kill_backend() {
                backend=$(pidof vhost-user-net) || return 1
                kill -KILL $backend
                kills=$((kills + 1))
                j=0
                while [ "$(grep -c 'backend back after' "$RESULTS_DIR/vm.log")" -lt "$kills" ]                     && [ "$j" -lt 300 ]; do
                    sleep 0.1; j=$((j + 1))
                done
                again=$(pidof vhost-user-net)
                [ -n "$again" ] && [ "$again" != "$backend" ]
            }
            if wait_guest "$RESULTS_DIR/guest.console" "CLOISTER-NET-1 " 1200; then
                mark guest.up yes
                sleep 1
                kill_backend && mark respawned.download yes
            fi
            if wait_guest "$RESULTS_DIR/guest.console" "CLOISTER-NET serving" 3000; then
                timeout 150 wget -q -O "$RESULTS_DIR/from-guest" http://10.14.0.2:8080/big &
                fetch=$!
                sleep 1
                kill_backend && mark respawned.upload yes
                wait "$fetch"
                mark guest.big "$(sha256sum <"$RESULTS_DIR/from-guest" | cut -d' ' -f1)"
                rm -f "$RESULTS_DIR/from-guest"
                touch /tmp/www/fetched
            fi
            if wait_guest "$RESULTS_DIR/guest.console" "CLOISTER-NET holding" 1200; then
                timeout 120 ping -f -c 3000 10.14.0.2 >"$RESULTS_DIR/flood.log" 2>&1 &
                flood=$!
                sleep 1
                kill_backend && mark respawned.flood yes
                wait "$flood"
                tail -n 3 "$RESULTS_DIR/flood.log"
                # After the flood: the guest answers again.
                for _ in 1 2 3 4 5; do
                    ping -c 1 -W 2 10.14.0.2 >/dev/null 2>&1 && { mark pings.after yes; break; }
                done
            fi
            mark kills "$kills"
            mark reported "$(grep -c 'backend exited with signal 9' "$RESULTS_DIR/vm.log")"
            running "$vm" && mark vm.alive yes
            wait_vm_exit 1200
            kill "$httpd" 2>/dev/null
            rm -rf /tmp/www
            show vm.log guest.console
            "#,
        ),
        scenario(
            "operator-and-server-mode",
            r#"
            "$BIN_DIR/vhost-user-net" --socket "$RESULTS_DIR/op.sock" --tap ctap5 \
                --ip 10.15.0.1 --mask 255.255.255.0 >"$RESULTS_DIR/op.log" 2>&1 &
            op=$!
            wait_socket "$RESULTS_DIR/op.sock"
            vm_net "$RESULTS_DIR/vm.log" op "cloister.nets=10.15.0.2/24@10.15.0.1" \
                --net "vhost_user=true,socket=$RESULTS_DIR/op.sock"
            wait_vm_exit 3000
            # Server mode: cloister listens, our backend connects (it was started first and
            # waits for the socket).
            "$BIN_DIR/vhost-user-net" --client --socket "$RESULTS_DIR/srv.sock" --tap ctap6 \
                --ip 10.16.0.1 --mask 255.255.255.0 >"$RESULTS_DIR/client.log" 2>&1 &
            client=$!
            vm_net "$RESULTS_DIR/vm2.log" srv "cloister.nets=10.16.0.2/24@10.16.0.1" \
                --net "socket=$RESULTS_DIR/srv.sock,vhost_mode=server"
            wait_vm_exit 3000
            kill -TERM "$op" "$client"
            wait "$op"; mark op.rc $?
            wait "$client"; mark client.rc $?
            show op.log vm.log op.console client.log vm2.log srv.console
            "#,
        ),
        scenario(
            "operator-restarted",
            r#"
            # The operator's backend dies under a running guest and is started again: cloister
            # takes it back and the guest's pings resume. The host side keeps its MAC, so the
            # guest's ARP entry stays good.
            start_op() {
                "$BIN_DIR/vhost-user-net" --socket "$RESULTS_DIR/rs.sock" --tap ctap8 \
                    --ip 10.18.0.1 --mask 255.255.255.0 --host-mac 02:18:00:00:00:01 \
                    >>"$RESULTS_DIR/rs.log" 2>&1 &
                op=$!
            }
            start_op
            wait_socket "$RESULTS_DIR/rs.sock"
            vm_net "$RESULTS_DIR/vm.log" rs "cloister.nets=10.18.0.2/24@10.18.0.1 cloister.hold=20" \
                --net "socket=$RESULTS_DIR/rs.sock"
            if wait_guest "$RESULTS_DIR/rs.console" "CLOISTER-NET holding" 1200; then
                mark guest.holding yes
            fi
            sleep 3
            kill -KILL "$op"
            wait "$op"
            wait_for "$RESULTS_DIR/vm.log" "waiting for the backend to come back" 100 && mark lost yes
            sleep 1
            start_op
            wait_for "$RESULTS_DIR/vm.log" "backend back after" 300 && mark back yes
            wait_vm_exit 3000
            kill -TERM "$op"
            wait "$op"
            mark op.rc $?
            show vm.log rs.console rs.log
            "#,
        ),
        scenario(
            "server-mode-restarted",
            r#"
            # Server mode: cloister listens, our backend connects (--client). It dies under a
            # running guest and is started again: cloister listens again on the same path and
            # takes the new connection.
            start_op() {
                "$BIN_DIR/vhost-user-net" --client --socket "$RESULTS_DIR/sv.sock" --tap ctap9 \
                    --ip 10.19.0.1 --mask 255.255.255.0 --host-mac 02:19:00:00:00:01 \
                    >>"$RESULTS_DIR/sv.log" 2>&1 &
                op=$!
            }
            start_op
            vm_net "$RESULTS_DIR/vm.log" sv "cloister.nets=10.19.0.2/24@10.19.0.1 cloister.hold=20" \
                --net "socket=$RESULTS_DIR/sv.sock,vhost_mode=server"
            if wait_guest "$RESULTS_DIR/sv.console" "CLOISTER-NET holding" 1200; then
                mark guest.holding yes
            fi
            sleep 3
            kill -KILL "$op"
            wait "$op"
            wait_for "$RESULTS_DIR/vm.log" "waiting for the backend to come back" 100 && mark lost yes
            sleep 1
            start_op
            wait_for "$RESULTS_DIR/vm.log" "backend back after" 300 && mark back yes
            wait_vm_exit 3000
            kill -TERM "$op"
            wait "$op"
            mark op.rc $?
            show vm.log sv.console sv.log
            "#,
        ),
        scenario(
            "qemu-drives-ours",
            r#"
            "$BIN_DIR/vhost-user-net" --socket "$RESULTS_DIR/net.sock" --tap ctap7 \
                --ip 10.17.0.1 --mask 255.255.255.0 --queues 2 >"$RESULTS_DIR/backend.log" 2>&1 &
            backend=$!
            wait_socket "$RESULTS_DIR/net.sock"
            iperf3 -s -D -B 10.17.0.1
            run qemu qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
                -object memory-backend-memfd,id=mem,size=512M,share=on -m 512M -smp 2 \
                -nodefaults -no-reboot -nographic -serial stdio \
                -chardev "socket,id=n0,path=$RESULTS_DIR/net.sock" \
                -netdev vhost-user,id=net0,chardev=n0,queues=2 \
                -device virtio-net-pci,netdev=net0,mq=on,vectors=6,mac=02:17:00:00:00:02,romfile= \
                -kernel "$GUEST_DIR/bzImage" -initrd "$GUEST_DIR/initramfs-tools.cpio" \
                -append "$(guest_cmdline netcheck cloister.nets=10.17.0.2/24@10.17.0.1 cloister.iperf=2 cloister.streams=4)"
            kill -TERM "$backend"
            wait "$backend"
            mark backend.rc $?
            kill $(pidof iperf3) 2>/dev/null
            show backend.log
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

fn positive(o: &ScenarioOutcome, tag: &str, key: &str) -> f64 {
    let v: f64 = field(o, tag, key).parse().unwrap_or(0.0);
    if v <= 0.0 {
        o.fail(&format!("{tag}{key} is not positive"));
    }
    v
}

/// The guest's interrupts per receive queue (`virtio0-input.1=57` on its `irqs` line).
fn rx_queue_interrupts(o: &ScenarioOutcome) -> Vec<u64> {
    let line = o
        .console
        .lines()
        .find(|l| l.contains("CLOISTER-NET irqs"))
        .unwrap_or_else(|| o.fail("no irqs line"));
    line.split_whitespace()
        .filter(|w| w.contains("-input."))
        .filter_map(|w| w.split_once('=')?.1.parse().ok())
        .collect()
}

#[test]
fn a_managed_nic_moves_data_both_ways_on_two_queue_pairs_with_offloads() {
    LAB.check("managed", |o| {
        o.expect_mark("tap.made", "yes")
            .expect_mark("vm.rc", "0")
            .expect_mark("tap.gone", "yes")
            .expect_console("CLOISTER-GUEST-RESULT test=netcheck rc=0")
            .expect_no_console("panicked");
        let nic = "CLOISTER-NET-1 ";
        expect_field(o, nic, "ping", "ok");
        // 100 MiB each way, TCP opened by the guest, then by the host.
        let host_big = o.mark("host.big").unwrap_or_else(|| o.fail("no host.big"));
        expect_field(o, "CLOISTER-NET fetched", "fetched", host_big);
        let served = field(o, "CLOISTER-NET served", "served");
        if o.mark("guest.big") != Some(served) {
            o.fail("the host's copy of the guest's 100 MiB differs");
        }
        positive(o, "CLOISTER-NET iperf_up", "iperf_up");
        positive(o, "CLOISTER-NET iperf_down", "iperf_down");
        // Two queue pairs, and receive interrupts on both.
        expect_field(o, nic, "pairs", "2");
        expect_field(o, nic, "mq", "1");
        expect_field(o, nic, "ctrl_vq", "1");
        let irqs = rx_queue_interrupts(o);
        if irqs.len() != 2 || irqs.contains(&0) {
            o.fail(&format!("receive interrupts per queue: {irqs:?}"));
        }
        // Offloads negotiated, and the guest's segments reach the tap larger than the MTU.
        for key in ["csum", "guest_tso4", "host_tso4", "mrg_rxbuf"] {
            expect_field(o, nic, key, "1");
        }
        let (bytes, packets) = (o.mark_u64("tap.rx_bytes"), o.mark_u64("tap.rx_packets"));
        if packets == 0 || bytes / packets <= 1514 {
            o.fail(&format!(
                "the tap got {packets} frames of {bytes} bytes: no large segments"
            ));
        }
    });
}

#[test]
fn jumbo_frames_and_two_nics() {
    LAB.check("jumbo-two-nics", |o| {
        o.expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=netcheck rc=0");
        expect_field(o, "CLOISTER-NET-1 ", "mtu", "9000");
        expect_field(o, "CLOISTER-NET-1 ", "bigping", "ok");
        expect_field(o, "CLOISTER-NET-2 ", "mtu", "1500");
        expect_field(o, "CLOISTER-NET-2 ", "ping", "ok");
        expect_field(o, "CLOISTER-NET-2 ", "mac", "02:12:00:00:00:02");
        let mac1 = field(o, "CLOISTER-NET-1 ", "mac");
        let first: u8 = u8::from_str_radix(mac1.get(..2).unwrap_or("01"), 16).unwrap_or(1);
        if first & 3 != 2 {
            o.fail(&format!(
                "default MAC {mac1} is not locally administered unicast"
            ));
        }
    });
}

#[test]
fn two_guests_on_a_bridge_reach_each_other() {
    LAB.check("two-guests", |o| {
        o.expect_mark("vm.rc", "0");
        let results = o
            .console
            .matches("CLOISTER-GUEST-RESULT test=netcheck rc=0")
            .count();
        if results != 2 {
            o.fail(&format!("{results} of the 2 guests passed"));
        }
        let pings = o.console.matches("ping=ok").count();
        if pings != 2 {
            o.fail(&format!("{pings} of the 2 guests reached the other"));
        }
    });
}

#[test]
fn a_killed_managed_backend_is_started_again_and_the_guest_goes_on() {
    LAB.check("backend-killed", |o| {
        o.expect_mark("guest.up", "yes")
            .expect_mark("respawned.download", "yes")
            .expect_mark("respawned.upload", "yes")
            .expect_mark("respawned.flood", "yes")
            .expect_mark("kills", "3")
            .expect_mark("reported", "3")
            .expect_mark("pings.after", "yes")
            .expect_mark("vm.alive", "yes")
            .expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=netcheck rc=0")
            .expect_console(
                "backend exited with signal 9 (SIGKILL); waiting for the backend to come back",
            )
            .expect_no_console("panicked");
        // Both transfers went through the restarts whole.
        let host_big = o.mark("host.big").unwrap_or("none");
        expect_field(o, "CLOISTER-NET fetched", "fetched", host_big);
        let served = field(o, "CLOISTER-NET served", "served");
        if o.mark("guest.big") != Some(served) {
            o.fail(&format!(
                "the host fetched {:?} from the guest, which served {served}",
                o.mark("guest.big")
            ));
        }
        let held: u64 = field(o, "CLOISTER-NET held", "held").parse().unwrap_or(0);
        if held < 10 {
            o.fail(&format!("{held} of 15 pings answered after the restarts"));
        }
    });
}

/// A backend killed and started again under a guest pinging once a second for 20 s: lost,
/// back, and most pings answered.
fn expect_taken_back(o: &ScenarioOutcome) {
    o.expect_mark("guest.holding", "yes")
        .expect_mark("lost", "yes")
        .expect_mark("back", "yes")
        .expect_mark("vm.rc", "0")
        .expect_mark("op.rc", "0")
        .expect_console("CLOISTER-GUEST-RESULT test=netcheck rc=0")
        .expect_no_console("panicked");
    let held: u64 = field(o, "CLOISTER-NET held", "held").parse().unwrap_or(0);
    if held < 12 {
        o.fail(&format!("{held} of 20 pings answered around the restart"));
    }
}

#[test]
fn an_operator_backend_restarted_under_a_running_guest_is_taken_back() {
    LAB.check("operator-restarted", expect_taken_back);
}

#[test]
fn a_backend_in_server_mode_restarted_under_a_running_guest_is_taken_back() {
    LAB.check("server-mode-restarted", expect_taken_back);
}

#[test]
fn operator_launched_backend_and_server_mode() {
    LAB.check("operator-and-server-mode", |o| {
        o.expect_mark("op.rc", "0")
            .expect_mark("client.rc", "0")
            .expect_no_console("panicked");
        let passed = o
            .console
            .matches("CLOISTER-GUEST-RESULT test=netcheck rc=0")
            .count();
        if passed != 2 {
            o.fail(&format!(
                "{passed} of the 2 guests passed (operator, server mode)"
            ));
        }
    });
}

#[test]
fn qemu_drives_our_vhost_user_net() {
    LAB.check("qemu-drives-ours", |o| {
        o.expect_mark("qemu.rc", "0")
            .expect_mark("backend.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=netcheck rc=0");
        expect_field(o, "CLOISTER-NET-1 ", "ping", "ok");
        expect_field(o, "CLOISTER-NET-1 ", "pairs", "2");
        positive(o, "CLOISTER-NET iperf_up", "iperf_up");
        positive(o, "CLOISTER-NET iperf_down", "iperf_down");
        // QEMU keeps the control queue and enables the second pair's rings: its tap queue
        // follows, and frames from the host reach both receive queues.
        let irqs = rx_queue_interrupts(o);
        if irqs.len() != 2 || irqs.contains(&0) {
            o.fail(&format!("receive interrupts per queue: {irqs:?}"));
        }
    });
}
