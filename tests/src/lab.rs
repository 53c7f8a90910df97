//! Runs scenarios in the lab: a QEMU VM under software emulation (L1) whose `/dev/kvm` is a
//! real `kvm_amd` with nested paging, or, on a host with hardware KVM, directly on the host.
//! The console streams into the test's output as it arrives, and comes back split per scenario.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::artifacts::{repo_root, Artifacts, Needs};
use crate::outcome::LabRun;
use crate::scenario::Scenario;
use crate::watchdog::Progress;
use crate::{binaries, HarnessError};

/// Where the scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inside the lab VM (QEMU, software emulation): works on any host; what CI uses here.
    Emulated,
    /// On this host, whose `/dev/kvm` is hardware KVM (Intel VMX or AMD SVM).
    Direct,
}

impl Mode {
    /// `CLOISTER_LAB=qemu|direct|auto` (default auto: direct on hardware KVM, else the lab).
    pub fn from_env() -> Result<Self, HarnessError> {
        match std::env::var("CLOISTER_LAB").as_deref() {
            Ok("qemu") | Ok("lab") => Ok(Mode::Emulated),
            Ok("direct") | Ok("host") => {
                if hardware_kvm() {
                    Ok(Mode::Direct)
                } else {
                    Err(HarnessError::Mode(
                        "CLOISTER_LAB=direct, but /dev/kvm here is not hardware KVM".into(),
                    ))
                }
            }
            Ok("auto") | Ok("") | Err(_) => Ok(if hardware_kvm() {
                Mode::Direct
            } else {
                Mode::Emulated
            }),
            Ok(other) => Err(HarnessError::Mode(format!(
                "CLOISTER_LAB={other}: expected qemu, direct or auto"
            ))),
        }
    }
}

/// Hardware KVM: `/dev/kvm` backed by kvm_intel or kvm_amd, not PVM (which runs stock guest
/// kernels only through its instruction emulator, where they die early).
pub fn hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

/// How big the lab VM is and what it carries.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// L1 memory; must hold the largest L2 guest a scenario boots.
    pub memory_mib: u64,
    pub cpus: u32,
    /// Attach the Debian root filesystem image (label `cloister-root`, writes discarded).
    pub rootfs: bool,
    /// Space on the payload disk for the scenarios' own files (sparse).
    pub payload_mib: u64,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            memory_mib: 8192,
            cpus: 2,
            rootfs: false,
            payload_mib: 2048,
        }
    }
}

/// What the lab's init prints after the last scenario.
const LAB_END: &str = "@@CLOISTER-LAB-END@@";

/// Boot time allowed on top of the scenarios' own timeouts.
const LAB_BOOT_ALLOWANCE: Duration = Duration::from_secs(180);

/// Runs the scenarios in one lab boot (or on the host in direct mode), in order. Should the lab
/// itself stop responding (the emulator or its kernel froze: no end marker long after a
/// scenario's own timeout), it is killed and the run ends with that problem; the scenarios it
/// did not finish have no outcome (`SharedRun::check` reruns them).
pub fn run(
    run_name: &str,
    scenarios: &[Scenario],
    options: &LabOptions,
) -> Result<LabRun, HarnessError> {
    let mode = Mode::from_env()?;
    // One lab at a time on the machine: each already uses every core.
    let _lock = lock_labs()?;
    let artifacts = Artifacts::build(Needs {
        lab: mode == Mode::Emulated,
        rootfs: options.rootfs,
    })?;
    let work = binaries::profile_dir()?.join("lab-runs").join(run_name);
    if work.exists() {
        fs::remove_dir_all(&work).map_err(|e| HarnessError::Io(work.clone(), e))?;
    }
    println!(
        "lab: running {} scenario(s) ({mode:?} mode)",
        scenarios.len()
    );
    let started = Instant::now();
    let (console, problem, results_root) = boot(mode, &artifacts, &work, scenarios, options)?;
    println!("lab: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(LabRun::parse(console, results_root, problem))
}

/// One lab boot: (console, why it ended early if it did, where the results are).
fn boot(
    mode: Mode,
    artifacts: &Artifacts,
    work: &Path,
    scenarios: &[Scenario],
    options: &LabOptions,
) -> Result<(String, Option<String>, PathBuf), HarnessError> {
    let payload = work.join("payload");
    write_payload(&payload, scenarios)?;
    let progress = Progress::new(scenarios, LAB_BOOT_ALLOWANCE);
    match mode {
        Mode::Emulated => {
            let image = work.join("payload.ext4");
            make_ext4(&payload, &image, "cloister-payload", options.payload_mib)?;
            let monitor = Monitor::new();
            let mut command = lab_command(artifacts, &image, &monitor, options)?;
            let mut supervised = supervise(&mut command, &progress, || monitor.dump())?;
            if supervised.problem.is_none() && !supervised.console.contains(LAB_END) {
                supervised.problem = Some("the lab stopped before finishing its scenarios".into());
            }
            // The payload disk holds what the scenarios left; copy it out without mounting.
            // After a killed lab it may be beyond reading: the console still tells why.
            if let Err(e) = extract_results(&image, work) {
                match &supervised.problem {
                    None => return Err(e),
                    Some(_) => println!("lab: cannot read the results back: {e}"),
                }
            }
            Ok((supervised.console, supervised.problem, work.join("results")))
        }
        Mode::Direct => {
            let mut command = Command::new("sh");
            command
                .arg(payload.join("run-scenarios.sh"))
                .env("GUEST_DIR", &artifacts.guest_dir);
            if let Some(rootfs) = &artifacts.rootfs_dir {
                command.env("ROOTFS_IMAGE", rootfs.join("debian.ext4"));
            }
            let supervised = supervise(&mut command, &progress, || {})?;
            Ok((
                supervised.console,
                supervised.problem,
                payload.join("results"),
            ))
        }
    }
}

fn lock_labs() -> Result<fs::File, HarnessError> {
    let dir = cache_dir();
    fs::create_dir_all(&dir).map_err(|e| HarnessError::Io(dir.clone(), e))?;
    let path = dir.join("lab-run.lock");
    let file = fs::File::create(&path).map_err(|e| HarnessError::Io(path.clone(), e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(HarnessError::Io(path, std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// `CLOISTER_CACHE`, or `~/.cache/cloister`, as `lab/build.sh` uses.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLOISTER_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/cloister")
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), HarnessError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| HarnessError::Io(parent.to_path_buf(), e))?;
    }
    fs::write(path, contents).map_err(|e| HarnessError::Io(path.to_path_buf(), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| HarnessError::Io(path.to_path_buf(), e))
}

fn copy_file(from: &Path, to: &Path) -> Result<(), HarnessError> {
    let contents = fs::read(from).map_err(|e| HarnessError::Io(from.to_path_buf(), e))?;
    write_file(to, &contents, 0o755)
}

/// The payload: the project's binaries, the scenario runner and each scenario's files.
fn write_payload(payload: &Path, scenarios: &[Scenario]) -> Result<(), HarnessError> {
    for binary in binaries::all()? {
        let name = binary.file_name().unwrap_or_default();
        copy_file(&binary, &payload.join("bin").join(name))?;
    }
    let lab = repo_root().join("lab");
    copy_file(
        &lab.join("run-scenarios.sh"),
        &payload.join("run-scenarios.sh"),
    )?;
    copy_file(
        &lab.join("scenario-lib.sh"),
        &payload.join("scenario-lib.sh"),
    )?;
    fs::create_dir_all(payload.join("results"))
        .map_err(|e| HarnessError::Io(payload.join("results"), e))?;
    for (index, scenario) in scenarios.iter().enumerate() {
        let dir = payload
            .join("scenarios")
            .join(format!("{index:03}-{}", scenario.name));
        write_file(&dir.join("script.sh"), scenario.script.as_bytes(), 0o755)?;
        let timeout = format!("{}\n", scenario.timeout.as_secs().max(1));
        write_file(&dir.join("timeout"), timeout.as_bytes(), 0o644)?;
        for (name, contents) in &scenario.files {
            write_file(&dir.join(name), contents, 0o755)?;
        }
    }
    Ok(())
}

fn run_tool(command: &mut Command) -> Result<(), HarnessError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .output()
        .map_err(|e| HarnessError::Spawn(program.clone(), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Tool(
            program,
            format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        ))
    }
}

fn make_ext4(dir: &Path, image: &Path, label: &str, extra_mib: u64) -> Result<(), HarnessError> {
    let used: u64 = walk_size(dir);
    let size = used * 12 / 10 + extra_mib * 1024 * 1024;
    let file = fs::File::create(image).map_err(|e| HarnessError::Io(image.to_path_buf(), e))?;
    file.set_len(size)
        .map_err(|e| HarnessError::Io(image.to_path_buf(), e))?;
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(image),
    )
}

fn walk_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => walk_size(&entry.path()) + 4096,
            Ok(meta) => meta.len() + 4096,
            Err(_) => 0,
        })
        .sum()
}

fn extract_results(image: &Path, into: &Path) -> Result<(), HarnessError> {
    run_tool(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /results {}", into.display()))
            .arg(image),
    )
}

/// The host's TSC frequency in kHz: under software emulation the guest's TSC runs at the host's
/// rate, and a loaded machine can make the guest's own calibration fail.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

fn lab_command(
    artifacts: &Artifacts,
    payload: &Path,
    monitor: &Monitor,
    options: &LabOptions,
) -> Result<Command, HarnessError> {
    let lab = artifacts
        .lab_dir
        .as_ref()
        .ok_or_else(|| HarnessError::LabBuild("lab/build.sh printed no LAB_DIR".into()))?;
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    if let Some(khz) = host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let drive =
        |path: &Path, extra: &str| format!("file={},if=virtio,format=raw{extra}", path.display());
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-M", "q35"])
        .args(["-m", &format!("{}M", options.memory_mib)])
        .args(["-smp", &options.cpus.to_string()])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-monitor", &monitor.qemu_arg()])
        .arg("-kernel")
        .arg(lab.join("bzImage"))
        .arg("-initrd")
        .arg(lab.join("initrd.cpio"))
        .args(["-append", &append])
        .args(["-drive", &drive(&lab.join("root.ext4"), ",readonly=on")])
        .args([
            "-drive",
            &drive(&artifacts.guest_dir.join("guest.ext4"), ",readonly=on"),
        ])
        .args(["-drive", &drive(payload, "")]);
    if let Some(rootfs) = &artifacts.rootfs_dir {
        // The guest may write to its root disk; snapshot=on keeps the cached image pristine.
        command.args([
            "-drive",
            &drive(&rootfs.join("debian.ext4"), ",snapshot=on"),
        ]);
    }
    Ok(command)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), HarnessError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success; we take ownership of them right away.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(HarnessError::Io(
            PathBuf::from("pipe"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What a supervised command printed, and how it ended.
struct Supervised {
    console: String,
    problem: Option<String>,
}

/// Runs `command` with stdout and stderr on one stream that is echoed line by line as it comes,
/// collected, and followed by `progress`; when `progress` finds the next marker overdue, calls
/// `on_stall` (for diagnostics) and kills the command's whole process group.
fn supervise(
    command: &mut Command,
    progress: &Progress,
    on_stall: impl FnOnce(),
) -> Result<Supervised, HarnessError> {
    let (reader, writer) = pipe()?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| HarnessError::Io(PathBuf::from("pipe"), e))?;
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child: Child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .process_group(0)
        .spawn()
        .map_err(|e| HarnessError::Spawn(program.clone(), e))?;
    // Drop our copies of the write end (the Command holds them) so EOF comes when the child ends.
    drop(std::mem::replace(command, Command::new("true")));

    let console = Mutex::new(String::new());
    let mut problem = None;
    thread::scope(|scope| -> Result<(), HarnessError> {
        let echo = scope.spawn(|| {
            let mut lines = BufReader::new(fs::File::from(reader));
            let mut raw = Vec::new();
            while let Ok(n) = lines.read_until(b'\n', &mut raw) {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                println!("| {line}");
                progress.observe(line);
                if let Ok(mut text) = console.lock() {
                    text.push_str(line);
                    text.push('\n');
                }
                raw.clear();
            }
        });
        let mut on_stall = Some(on_stall);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        problem = Some(format!("{program} exited with {status}"));
                    }
                    break;
                }
                Ok(None) => {
                    if let Some(overdue) = progress.overdue() {
                        problem = Some(format!("the lab stopped responding {overdue}"));
                        println!("lab: {program} stopped responding {overdue}; killing it");
                        if let Some(dump) = on_stall.take() {
                            dump();
                        }
                        // SAFETY: signals the process group we created for the child.
                        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                        let _ = child.wait();
                        break;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(HarnessError::Spawn(program.clone(), e)),
            }
        }
        // Stragglers of the group (direct mode) would keep the pipe open.
        // SAFETY: as above; the group may already be gone.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = echo.join();
        Ok(())
    })?;
    let console = console.into_inner().unwrap_or_default();
    Ok(Supervised { console, problem })
}

/// The lab QEMU's human monitor on a UNIX socket, read only when the lab stops responding: where
/// its vCPUs are tells an emulator hang from a guest kernel one.
struct Monitor {
    path: PathBuf,
}

impl Monitor {
    fn new() -> Self {
        Monitor {
            path: std::env::temp_dir().join(format!("cloister-lab-{}.monitor", std::process::id())),
        }
    }

    fn qemu_arg(&self) -> String {
        format!("unix:{},server=on,wait=off", self.path.display())
    }

    /// Prints QEMU's view of the lab's state; best effort, bounded in time.
    fn dump(&self) {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let Ok(mut stream) = UnixStream::connect(&self.path) else {
            println!(
                "lab: the QEMU monitor at {} does not answer",
                self.path.display()
            );
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(b"info status\ninfo cpus\ninfo registers -a\ninfo irq\n");
        let mut text = Vec::new();
        let mut buf = [0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
        }
        println!("lab: --- QEMU monitor ---");
        // The monitor echoes each command with line-editing escapes; the vector registers
        // say nothing about a hang.
        let noise = ["(qemu)", "FPR", "YMM", "XMM", "FCW="];
        for line in String::from_utf8_lossy(&text).lines() {
            if !noise.iter().any(|n| line.starts_with(n)) {
                println!("lab| {}", line.trim_end_matches('\r'));
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
