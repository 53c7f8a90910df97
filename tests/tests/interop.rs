//! Standard vhost-user both ways, in the lab: cloister drives qemu-storage-daemon's
//! vhost-user-blk export, and QEMU drives our vhost-user-blk; in both the guest writes and reads
//! back and the host checks the bytes in the image. And a stock Debian 12 root filesystem boots
//! to systemd's multi-user target from a vhost-user-blk root disk.

use std::time::Duration;

use harness::{LabOptions, Scenario, ScenarioOutcome, SharedRun, QEMU_MICROVM};

static LAB: SharedRun = SharedRun::new("interop", scenarios, options);

fn options() -> LabOptions {
    LabOptions {
        rootfs: true,
        ..LabOptions::default()
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "cloister-drives-qsd",
            r#"
            img="$RESULTS_DIR/q.img"
            truncate -s 64M "$img"
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=f,filename=$img" \
                --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$RESULTS_DIR/qsd.sock,writable=on" \
                >"$RESULTS_DIR/qsd.log" 2>&1 &
            qsd=$!
            wait_socket "$RESULTS_DIR/qsd.sock" || cat "$RESULTS_DIR/qsd.log"
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/vmlinux" \
                --initramfs "$GUEST_DIR/initramfs.cpio" --cmdline "$(guest_cmdline blk)" \
                --disk "socket=$RESULTS_DIR/qsd.sock"
            mark_image_sums vda "$img"
            kill "$qsd"
            rm -f "$img"
            "#,
        )
        .timeout(Duration::from_secs(180)),
        Scenario::new(
            "qemu-drives-ours",
            r#"
            img="$RESULTS_DIR/o.img"
            truncate -s 64M "$img"
            "$BIN_DIR/vhost-user-blk" --socket "$RESULTS_DIR/ours.sock" --image "$img" \
                >"$RESULTS_DIR/backend.log" 2>&1 &
            backend=$!
            wait_socket "$RESULTS_DIR/ours.sock" || cat "$RESULTS_DIR/backend.log"
            run qemu qemu-system-x86_64 -accel kvm -cpu host -M q35,memory-backend=mem \
                -object memory-backend-memfd,id=mem,size=512M,share=on -m 512M -smp 1 \
                -nodefaults -no-reboot -nographic -serial stdio \
                -chardev "socket,id=blk0,path=$RESULTS_DIR/ours.sock" \
                -device vhost-user-blk-pci,chardev=blk0 \
                -kernel "$GUEST_DIR/bzImage" -initrd "$GUEST_DIR/initramfs.cpio" \
                -append "$(guest_cmdline blk)"
            mark_image_sums vda "$img"
            kill -TERM "$backend"
            wait "$backend"
            mark backend.rc $?
            rm -f "$img"
            "#,
        )
        .timeout(Duration::from_secs(180)),
        // QEMU's microvm sets up 1024-entry rings on virtio-mmio; our backend takes them at
        // its defaults (it used to refuse anything above its --queue-size).
        Scenario::new(
            "qemu-microvm-drives-ours",
            &format!(
                r#"
                img="$RESULTS_DIR/m.img"
                truncate -s 64M "$img"
                "$BIN_DIR/vhost-user-blk" --socket "$RESULTS_DIR/ours.sock" --image "$img" \
                    >"$RESULTS_DIR/backend.log" 2>&1 &
                backend=$!
                wait_socket "$RESULTS_DIR/ours.sock" || cat "$RESULTS_DIR/backend.log"
                run qemu qemu-system-x86_64 {QEMU_MICROVM} \
                    -object memory-backend-memfd,id=mem,size=512M,share=on \
                    -machine memory-backend=mem \
                    -chardev "socket,id=blk0,path=$RESULTS_DIR/ours.sock" \
                    -device vhost-user-blk,chardev=blk0 \
                    -initrd "$GUEST_DIR/initramfs.cpio" -append "$(guest_cmdline blk)"
                mark_image_sums vda "$img"
                kill -TERM "$backend"
                wait "$backend"
                mark backend.rc $?
                cat "$RESULTS_DIR/backend.log"
                rm -f "$img"
                "#
            ),
        )
        .timeout(Duration::from_secs(180)),
        Scenario::new(
            "debian-root-on-vhost-user-blk",
            r#"
            disk=$(findfs LABEL=cloister-root)
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/bzImage" \
                --initramfs "$GUEST_DIR/initramfs.cpio" --memory size=1G \
                --cmdline "console=ttyS0 quiet panic=-1 cloister.root=/dev/vda cloister.poweroff" \
                --disk "path=$disk"
            "#,
        )
        .timeout(Duration::from_secs(300)),
    ]
}

/// The guest's blk test wrote 2 MiB at MiB offsets 0, 5 and 37 of vda and read the same bytes
/// back, and the host's image holds them.
fn expect_round_trip(outcome: &ScenarioOutcome) {
    outcome.expect_console("CLOISTER-GUEST-RESULT test=blk rc=0");
    for off in [0, 5, 37] {
        let tag = format!("CLOISTER-BLK-DATA-vda-{off} ");
        let written = outcome.field(&tag, "written");
        let read = outcome.field(&tag, "read");
        if written.is_none() || written != read {
            outcome.fail(&format!(
                "at {off} MiB the guest wrote {written:?}, read {read:?}"
            ));
        }
        if outcome.mark(&format!("img.vda.{off}")) != written {
            outcome.fail(&format!(
                "at {off} MiB the image does not hold what the guest wrote"
            ));
        }
    }
}

#[test]
fn cloister_drives_qemu_storage_daemon() {
    LAB.check("cloister-drives-qsd", |outcome| {
        outcome.expect_mark("vm.rc", "0");
        expect_round_trip(outcome);
    });
}

#[test]
fn qemu_drives_our_vhost_user_blk() {
    LAB.check("qemu-drives-ours", |outcome| {
        outcome
            .expect_mark("qemu.rc", "0")
            .expect_mark("backend.rc", "0");
        expect_round_trip(outcome);
    });
}

#[test]
fn qemu_microvm_rings_of_1024_on_our_backend_at_its_defaults() {
    LAB.check("qemu-microvm-drives-ours", |outcome| {
        outcome
            .expect_mark("qemu.rc", "0")
            .expect_mark("backend.rc", "0")
            .expect_no_console("out of range")
            .expect_no_console("vhost start failed");
        expect_round_trip(outcome);
    });
}

#[test]
fn debian_boots_to_multi_user_from_a_vhost_user_blk_root_disk() {
    LAB.check("debian-root-on-vhost-user-blk", |outcome| {
        outcome
            .expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-DEBIAN-UP");
    });
}
