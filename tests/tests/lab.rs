//! The lab proves itself: its /dev/kvm is a real KVM with nested paging, and QEMU inside it
//! boots the test guest to its userspace marker with `-accel kvm`, and the Debian 12 image to
//! systemd's multi-user target.

use std::time::Duration;

use harness::{LabOptions, Mode, Scenario, SharedRun, QEMU_MICROVM};

static LAB: SharedRun = SharedRun::new("lab", scenarios, options);

fn options() -> LabOptions {
    LabOptions {
        rootfs: true,
        ..LabOptions::default()
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "kvm",
            r#"
            test -c /dev/kvm && mark kvm.dev yes
            for vendor in amd intel; do
                if [ -d /sys/module/kvm_$vendor ]; then
                    mark kvm.vendor $vendor
                    p=/sys/module/kvm_$vendor/parameters
                    if [ $vendor = amd ]; then tdp=$(cat $p/npt); else tdp=$(cat $p/ept); fi
                    mark kvm.tdp "$tdp"
                    mark kvm.nested "$(cat $p/nested)"
                fi
            done
            test -d /sys/module/kvm_pvm && mark kvm.pvm yes
            true
            "#,
        ),
        Scenario::new(
            "qemu-boots-guest",
            r#"
            run qemu qemu-system-x86_64 -accel kvm -cpu host \
                -M microvm,pit=off,pic=off,rtc=on -m 256M -smp 1 \
                -nodefaults -no-reboot -nographic -serial stdio \
                -kernel "$GUEST_DIR/bzImage" -initrd "$GUEST_DIR/initramfs.cpio" \
                -append "$(guest_cmdline info)"
            "#,
        )
        .timeout(Duration::from_secs(120)),
        // The Debian 12 image boots to multi-user.target from a virtio disk, through the test
        // guest's initramfs (Debian's kernel has virtio_blk as a module).
        Scenario::new(
            "qemu-boots-debian",
            r#"
            disk=$(findfs LABEL=cloister-root)
            run qemu qemu-system-x86_64 -accel kvm -cpu host \
                -M microvm,pit=off,pic=off,rtc=on -m 512M -smp 1 \
                -nodefaults -no-reboot -nographic -serial stdio \
                -drive id=root,file="$disk",format=raw,if=none \
                -device virtio-blk-device,drive=root \
                -kernel "$GUEST_DIR/bzImage" -initrd "$GUEST_DIR/initramfs.cpio" \
                -append "console=ttyS0 quiet panic=-1 cloister.root=/dev/vda cloister.poweroff"
            "#,
        )
        .timeout(Duration::from_secs(240)),
        // The test guest's network, file-system and fio tests, against QEMU as the reference
        // VMM and the lab's own peers (a tap, the C virtiofsd, iperf3), so a failure in a
        // Cloister test is not the guest's.
        Scenario::new(
            "guest-net-with-qemu",
            &format!(
                r#"
                ip tuntap add dev tap0 mode tap
                ip addr add 10.0.2.1/24 dev tap0
                ip link set tap0 up
                iperf3 -s -1 -D
                run qemu qemu-system-x86_64 {QEMU_MICROVM} \
                    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
                    -device virtio-net-device,netdev=n0 \
                    -initrd "$GUEST_DIR/initramfs-tools.cpio" \
                    -append "$(guest_cmdline net cloister.iperf=2)"
                "#
            ),
        )
        .timeout(Duration::from_secs(180)),
        Scenario::new(
            "guest-fs-with-qemu-and-virtiofsd",
            &format!(
                r#"
                mkdir -p /tmp/share
                seq 1 5000 >/tmp/share/from-host
                /usr/lib/qemu/virtiofsd --socket-path=/tmp/vfs.sock -o source=/tmp/share \
                    -o cache=none >"$RESULTS_DIR/virtiofsd.log" 2>&1 &
                for i in $(seq 50); do [ -S /tmp/vfs.sock ] && break; sleep 0.1; done
                run qemu qemu-system-x86_64 {QEMU_MICROVM} \
                    -object memory-backend-memfd,id=mem,size=512M,share=on \
                    -machine memory-backend=mem \
                    -chardev socket,id=vfs,path=/tmp/vfs.sock \
                    -device vhost-user-fs-device,chardev=vfs,tag=fs0 \
                    -initrd "$GUEST_DIR/initramfs.cpio" -append "$(guest_cmdline fs)"
                mark from_host "$(sha256sum /tmp/share/from-host | cut -d' ' -f1)"
                mark from_guest "$(sha256sum /tmp/share/from-guest | cut -d' ' -f1)"
                "#
            ),
        )
        .timeout(Duration::from_secs(180)),
        Scenario::new(
            "guest-fio-with-qemu",
            &format!(
                r#"
                truncate -s 256M /tmp/disk.img
                run qemu qemu-system-x86_64 {QEMU_MICROVM} \
                    -drive id=d0,file=/tmp/disk.img,format=raw,if=none \
                    -device virtio-blk-device,drive=d0 \
                    -initrd "$GUEST_DIR/initramfs-tools.cpio" \
                    -append "$(guest_cmdline fio cloister.fio=randread,4k,32,3)"
                "#
            ),
        )
        .timeout(Duration::from_secs(180)),
    ]
}

#[test]
fn lab_kvm_is_real_kvm_with_nested_paging() {
    LAB.check("kvm", |kvm| {
        kvm.expect_rc(0).expect_mark("kvm.dev", "yes");
        if kvm.mark("kvm.pvm").is_some() {
            kvm.fail("the lab's /dev/kvm is PVM");
        }
        // Both report nested paging as Y or 1 depending on the kernel version.
        if !matches!(kvm.mark("kvm.tdp"), Some("Y" | "1")) {
            kvm.fail("two-dimensional paging (NPT/EPT) is off");
        }
        match Mode::from_env() {
            // The lab's CPU is QEMU's emulated `max` CPU, which offers AMD SVM.
            Ok(Mode::Emulated) => {
                kvm.expect_mark("kvm.vendor", "amd");
            }
            _ => {
                if !matches!(kvm.mark("kvm.vendor"), Some("amd" | "intel")) {
                    kvm.fail("neither kvm_amd nor kvm_intel is loaded");
                }
            }
        }
    });
}

#[test]
fn qemu_inside_the_lab_boots_the_test_guest() {
    LAB.check("qemu-boots-guest", |outcome| {
        outcome
            .expect_rc(0)
            .expect_mark("qemu.rc", "0")
            .expect_console("CLOISTER-GUEST-UP")
            .expect_console("CLOISTER-GUEST-RESULT test=info rc=0");
    });
}

#[test]
fn qemu_inside_the_lab_boots_debian_to_multi_user() {
    LAB.check("qemu-boots-debian", |outcome| {
        outcome
            .expect_mark("qemu.rc", "0")
            .expect_console("CLOISTER-DEBIAN-UP");
    });
}

#[test]
fn test_guest_networks_with_qemu_through_a_tap() {
    LAB.check("guest-net-with-qemu", |outcome| {
        outcome
            .expect_mark("qemu.rc", "0")
            .expect_console("CLOISTER-NET ping=ok")
            .expect_console("CLOISTER-GUEST-RESULT test=net rc=0");
        let bps: f64 = outcome
            .field("CLOISTER-NET iperf_bps", "iperf_bps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if bps <= 0.0 {
            outcome.fail("iperf3 moved no data");
        }
    });
}

#[test]
fn test_guest_shares_files_with_qemu_and_virtiofsd() {
    LAB.check("guest-fs-with-qemu-and-virtiofsd", |outcome| {
        outcome
            .expect_mark("qemu.rc", "0")
            .expect_console("CLOISTER-FS mount=ok")
            .expect_console("CLOISTER-GUEST-RESULT test=fs rc=0");
        let guest_read = outcome.field("CLOISTER-FS from_host_sha256", "from_host_sha256");
        if guest_read != outcome.mark("from_host") {
            outcome.fail("the guest read other bytes than the host's file holds");
        }
        let guest_wrote = outcome.field("CLOISTER-FS from_guest_sha256", "from_guest_sha256");
        if guest_wrote != outcome.mark("from_guest") {
            outcome.fail("the host's copy of the guest's file differs");
        }
    });
}

#[test]
fn test_guest_runs_fio_with_qemu() {
    LAB.check("guest-fio-with-qemu", |outcome| {
        outcome
            .expect_mark("qemu.rc", "0")
            .expect_console("CLOISTER-GUEST-RESULT test=fio rc=0");
        let iops: f64 = outcome
            .field("CLOISTER-FIO", "read_iops")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if iops <= 0.0 {
            outcome.fail("fio reported no reads");
        }
    });
}
