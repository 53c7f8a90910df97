//! The lab proves itself: its /dev/kvm is a real KVM with nested paging, and QEMU inside it
//! boots the test guest to its userspace marker with `-accel kvm`, and the Debian 12 image to
//! systemd's multi-user target.

use std::time::Duration;

use harness::{LabOptions, Mode, Scenario, SharedRun};

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
    ]
}

#[test]
fn lab_kvm_is_real_kvm_with_nested_paging() {
    let kvm = LAB.scenario("kvm");
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
}

#[test]
fn qemu_inside_the_lab_boots_the_test_guest() {
    LAB.scenario("qemu-boots-guest")
        .expect_rc(0)
        .expect_mark("qemu.rc", "0")
        .expect_console("CLOISTER-GUEST-UP")
        .expect_console("CLOISTER-GUEST-RESULT test=info rc=0");
}

#[test]
fn qemu_inside_the_lab_boots_debian_to_multi_user() {
    LAB.scenario("qemu-boots-debian")
        .expect_mark("qemu.rc", "0")
        .expect_console("CLOISTER-DEBIAN-UP");
}
