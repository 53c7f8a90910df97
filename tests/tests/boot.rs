//! `cloister` boots the stock Debian kernel (the lab's test guest) to userspace: PVH and bzImage
//! entry, 1, 2 and 4 vCPUs, memory below and above 4 GiB, and each way a guest can end.

use std::time::Duration;

use harness::{LabOptions, Scenario, ScenarioOutcome, SharedRun};

static LAB: SharedRun = SharedRun::new("boot", scenarios, LabOptions::default);

/// A scenario that boots the test guest running `test` with cloister's extra `args`.
fn boot(name: &str, kernel: &str, test: &str, args: &str) -> Scenario {
    Scenario::new(
        name,
        &format!(
            r#"
            run vm "$BIN_DIR/cloister" --kernel "$GUEST_DIR/{kernel}" \
                --initramfs "$GUEST_DIR/initramfs.cpio" \
                --cmdline "$(guest_cmdline {test})" {args}
            "#
        ),
    )
    .timeout(Duration::from_secs(180))
}

fn scenarios() -> Vec<Scenario> {
    vec![
        boot(
            "pvh-1cpu",
            "vmlinux",
            "info",
            "--cpus boot=1 --memory size=512M",
        ),
        boot(
            "bzimage-2cpu",
            "bzImage",
            "info",
            "--cpus boot=2 --memory size=1G",
        ),
        boot(
            "pvh-4cpu",
            "vmlinux",
            "info",
            "--cpus boot=4 --memory size=512M",
        ),
        boot("memory-5g", "vmlinux", "info", "--memory size=5G"),
        boot("default-memory", "bzImage", "info", ""),
        boot("panic", "vmlinux", "panic", ""),
        boot("reboot", "vmlinux", "reboot", ""),
    ]
}

/// The guest reached userspace, ran its test, and powered off; cloister exited 0.
fn powered_off(outcome: &ScenarioOutcome) -> &ScenarioOutcome {
    outcome
        .expect_mark("vm.rc", "0")
        .expect_console("CLOISTER-GUEST-UP")
        .expect_console("CLOISTER-GUEST-RESULT test=info rc=0");
    outcome
}

fn expect_cpus(outcome: &ScenarioOutcome, count: u32) {
    let seen = outcome.field("CLOISTER-INFO", "cpus");
    if seen != Some(count.to_string().as_str()) {
        outcome.fail(&format!("guest sees {seen:?} CPUs, expected {count}"));
    }
    let online = if count == 1 {
        "0".to_string()
    } else {
        format!("0-{}", count - 1)
    };
    if outcome.field("CLOISTER-INFO", "online") != Some(online.as_str()) {
        outcome.fail(&format!("online CPUs are not {online}"));
    }
}

/// The memory map the guest kernel received covers the request (less the legacy holes below
/// 1 MiB: within 1 %), and MemTotal, which excludes what the kernel keeps for itself (its image
/// and page structs, about 40 MiB at 512 MiB; plus the 64 MiB swiotlb above 4 GiB), is within
/// 64 MiB + 4 % of it.
fn expect_memory(outcome: &ScenarioOutcome, mib: u64) {
    let field = |key: &str| -> u64 {
        outcome
            .field("CLOISTER-INFO", key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| outcome.fail(&format!("no {key} in the guest's report")))
    };
    let want_kib = mib * 1024;
    let mapped_kib = field("memory_map_kb");
    if mapped_kib > want_kib || mapped_kib < want_kib * 99 / 100 {
        outcome.fail(&format!(
            "guest memory map has {mapped_kib} KiB, requested {want_kib} KiB"
        ));
    }
    let total_kib = field("memtotal_kb");
    if total_kib > want_kib || total_kib + 64 * 1024 + want_kib / 25 < want_kib {
        outcome.fail(&format!(
            "guest MemTotal is {total_kib} KiB, requested {want_kib} KiB"
        ));
    }
}

#[test]
fn pvh_vmlinux_boots_to_userspace_with_one_cpu() {
    LAB.check("pvh-1cpu", |outcome| {
        powered_off(outcome);
        expect_cpus(outcome, 1);
        expect_memory(outcome, 512);
    });
}

#[test]
fn bzimage_boots_to_userspace_with_two_cpus() {
    LAB.check("bzimage-2cpu", |outcome| {
        powered_off(outcome);
        expect_cpus(outcome, 2);
        expect_memory(outcome, 1024);
    });
}

#[test]
fn four_cpus_are_all_online() {
    LAB.check("pvh-4cpu", |outcome| expect_cpus(powered_off(outcome), 4));
}

#[test]
fn memory_above_4g_is_usable() {
    LAB.check("memory-5g", |outcome| {
        expect_memory(powered_off(outcome), 5 * 1024)
    });
}

#[test]
fn defaults_are_one_cpu_and_512m() {
    LAB.check("default-memory", |outcome| {
        powered_off(outcome);
        expect_cpus(outcome, 1);
        expect_memory(outcome, 512);
    });
}

#[test]
fn guest_panic_is_a_failure_exit() {
    LAB.check("panic", |outcome| {
        outcome.expect_console("CLOISTER-GUEST-UP");
        if matches!(outcome.mark("vm.rc"), Some("0") | None) {
            outcome.fail("cloister exited 0 (or never) after a guest panic");
        }
        outcome.expect_console("panicked");
    });
}

#[test]
fn guest_reboot_exits_zero_and_says_so() {
    LAB.check("reboot", |outcome| {
        outcome
            .expect_mark("vm.rc", "0")
            .expect_console("CLOISTER-GUEST-UP")
            .expect_console("reboot");
    });
}
