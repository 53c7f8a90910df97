//! `cloister-remote`: drives a running cloister through its API socket, with Cloud
//! Hypervisor's `ch-remote` verbs and argument syntax (a device's configuration is written as
//! on cloister's command line: `add-disk path=/img.raw,readonly=on`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::api::{body, client};

/// Sends one request to cloister's API (`--api-socket`) and prints the reply's body.
#[derive(Debug, Parser)]
#[command(name = "cloister-remote", version)]
struct Remote {
    /// cloister's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Checks that cloister answers (its version and process id).
    Ping,
    /// The VM's state, configuration and devices.
    Info,
    /// Per device counters.
    Counters,
    /// Creates the VM from a Cloud Hypervisor VmConfig in JSON (a file, or - for stdin).
    Create { config: PathBuf },
    /// Boots the created VM.
    Boot,
    /// Shuts the VM down (cloister stays).
    Shutdown,
    /// Shuts the VM down if it runs and forgets its configuration.
    Delete,
    /// Stops cloister.
    ShutdownVmm,
    /// Pauses the VM.
    Pause,
    /// Resumes the paused VM.
    Resume,
    /// Reboots the VM (not served by cloister yet).
    Reboot,
    /// Presses the VM's ACPI power button.
    PowerButton,
    /// Adds a disk: --disk's syntax (path=FILE|socket=PATH[,...]).
    AddDisk { config: String },
    /// Adds a NIC: --net's syntax (tap=NAME|socket=PATH[,...]).
    AddNet { config: String },
    /// Adds a virtio-fs share: --fs's syntax (tag=TAG,socket=PATH[,...]).
    AddFs { config: String },
    /// Adds a vsock device: --vsock's syntax (cid=N,socket=PATH).
    AddVsock { config: String },
    /// Adds a device any vhost-user backend serves: --generic-vhost-user's syntax.
    AddGenericVhostUser { config: String },
    /// Removes the device with this id.
    RemoveDevice { id: String },
}

fn main() -> ExitCode {
    let remote = Remote::parse();
    match run(&remote) {
        Ok(output) => {
            if !output.is_empty() {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("cloister-remote: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(remote: &Remote) -> Result<String, String> {
    let put = |endpoint: &str| (endpoint.to_string(), "PUT", None);
    let device = |endpoint: &str, option: &str, config: &str| {
        let body = serde_json::Value::Object(body::option_json(option, config));
        (endpoint.to_string(), "PUT", Some(body.to_string()))
    };
    let (endpoint, method, body) = match &remote.command {
        Verb::Ping => ("vmm.ping".to_string(), "GET", None),
        Verb::Info => ("vm.info".to_string(), "GET", None),
        Verb::Counters => ("vm.counters".to_string(), "GET", None),
        Verb::Create { config } => {
            let text = read_config(config)?;
            ("vm.create".to_string(), "PUT", Some(text))
        }
        Verb::Boot => put("vm.boot"),
        Verb::Shutdown => put("vm.shutdown"),
        Verb::Delete => put("vm.delete"),
        Verb::ShutdownVmm => put("vmm.shutdown"),
        Verb::Pause => put("vm.pause"),
        Verb::Resume => put("vm.resume"),
        Verb::Reboot => put("vm.reboot"),
        Verb::PowerButton => put("vm.power-button"),
        Verb::AddDisk { config } => device("vm.add-disk", "--disk", config),
        Verb::AddNet { config } => device("vm.add-net", "--net", config),
        Verb::AddFs { config } => device("vm.add-fs", "--fs", config),
        Verb::AddVsock { config } => device("vm.add-vsock", "--vsock", config),
        Verb::AddGenericVhostUser { config } => {
            device("vm.add-generic-vhost-user", "--generic-vhost-user", config)
        }
        Verb::RemoveDevice { id } => (
            "vm.remove-device".to_string(),
            "PUT",
            Some(serde_json::json!({ "id": id }).to_string()),
        ),
    };
    let reply = client::call(&remote.api_socket, method, &endpoint, body.as_deref())
        .map_err(|e| vmm::error_chain(&e))?;
    if !(200..300).contains(&reply.status) {
        return Err(format!(
            "{endpoint}: HTTP {}: {}",
            reply.status,
            reply.body.trim_end()
        ));
    }
    // JSON replies pretty-printed, as ch-remote prints them.
    Ok(
        match serde_json::from_str::<serde_json::Value>(&reply.body) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(reply.body),
            Err(_) => reply.body.trim_end().to_string(),
        },
    )
}

fn read_config(path: &PathBuf) -> Result<String, String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the configuration from stdin: {e}"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}
