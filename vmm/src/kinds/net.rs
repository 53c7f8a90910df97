//! `--net`: virtio-net, served by a vhost-user network backend. Cloud Hypervisor's syntax:
//!
//! - managed: `[tap=NAME][,ip=A.B.C.D,mask=M.M.M.M][,host_mac=MAC][,mtu=N]` — the spawner
//!   creates (or opens) the tap with one queue per queue pair and configures its host side,
//!   then starts `vhost-user-net` with the tap's descriptors, so the backend needs no network
//!   privilege; it goes with the VM, and so does the tap it created. No `tap=` (or an empty
//!   one) lets the kernel pick a free name (`vmtapN`);
//! - operator-launched: `socket=PATH` (also `vhost_user=true,socket=PATH`) — ours, OVS-DPDK,
//!   DPDK's `net_vhost`, ...; with `vhost_mode=server` cloister listens on PATH and the backend
//!   connects (OVS-DPDK's `dpdkvhostuserclient`, DPDK's `client=1`), at start-up only.
//!
//! Both take `mac=` (the guest's; default: a locally administered address made from the
//! device's id, tap or socket, stable from one run to the next), `mtu=`, `num_queues=` (all the
//! receive and transmit queues, even; 2 by default) and the shared keys. The control queue
//! comes on top when the backend has one (ours does, and handles it: the VMM stays out).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cloister_seccomp::SeccompMode;
use cloister_tap::{InterfaceConfig, MacAddr};

use super::{Arg, Backend, DeviceSpec, SpawnProfile, TapRequest};
use crate::config::device::{number, switch, CommonOptions, OptionError};
use crate::vhost_user::kind::{ConfigSpace, DeviceKind};

pub const OPTION: &str = "--net";
pub const DEVICE_TYPE: u32 = 1;
/// vhost-user-net's limit (31 pairs and the control queue in a 64-bit mask), as virtqueues.
pub const MAX_QUEUES: u16 = 62;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;
const KEYS: &[&str] = &[
    "tap",
    "ip",
    "mask",
    "mac",
    "host_mac",
    "mtu",
    "vhost_user",
    "vhost_mode",
    "offload_tso",
    "offload_ufo",
    "offload_csum",
];
const EXPECTED: &str = "tap=NAME,ip=A.B.C.D,mask=M.M.M.M or socket=PATH";

const F_CSUM: u32 = 0;
const F_GUEST_CSUM: u32 = 1;
const F_CTRL_GUEST_OFFLOADS: u32 = 2;
const F_MTU: u32 = 3;
const F_MAC: u32 = 5;
const F_GUEST_TSO4: u32 = 7;
const F_GUEST_TSO6: u32 = 8;
const F_GUEST_ECN: u32 = 9;
const F_GUEST_UFO: u32 = 10;
const F_HOST_TSO4: u32 = 11;
const F_HOST_TSO6: u32 = 12;
const F_HOST_ECN: u32 = 13;
const F_HOST_UFO: u32 = 14;
const F_MRG_RXBUF: u32 = 15;
const F_STATUS: u32 = 16;
const F_CTRL_VQ: u32 = 17;
const F_CTRL_RX: u32 = 18;
const F_CTRL_VLAN: u32 = 19;
const F_CTRL_RX_EXTRA: u32 = 20;
const F_GUEST_ANNOUNCE: u32 = 21;
const F_MQ: u32 = 22;
const F_CTRL_MAC_ADDR: u32 = 23;
const F_GUEST_USO4: u32 = 54;
const F_GUEST_USO6: u32 = 55;
const F_HOST_USO: u32 = 56;
/// VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;

fn bits(features: &[u32]) -> u64 {
    features.iter().fold(0, |acc, f| acc | (1u64 << f))
}

/// What needs the control queue.
fn control_features() -> u64 {
    bits(&[
        F_CTRL_VQ,
        F_CTRL_RX,
        F_CTRL_VLAN,
        F_CTRL_RX_EXTRA,
        F_GUEST_ANNOUNCE,
        F_MQ,
        F_CTRL_MAC_ADDR,
        F_CTRL_GUEST_OFFLOADS,
    ])
}

pub fn parse(value: &str, seccomp: SeccompMode) -> Result<DeviceSpec, OptionError> {
    let (common, own) = CommonOptions::parse(value, KEYS, EXPECTED, MAX_QUEUES)?;
    let mut o = NetKeys::default();
    for (key, v) in own {
        match key {
            "tap" => o.tap = Some(v.to_string()),
            "ip" => o.ip = Some(ipv4("ip", v)?),
            "mask" => o.mask = Some(ipv4("mask", v)?),
            "mac" => o.mac = Some(mac("mac", v)?),
            "host_mac" => o.host_mac = Some(mac("host_mac", v)?),
            "mtu" => {
                let mtu = number("mtu", v)?;
                if !(68..=65535).contains(&mtu) {
                    return Err(OptionError::Range {
                        key: "mtu",
                        value: mtu,
                        min: 68,
                        max: 65535,
                    });
                }
                o.mtu = Some(mtu as u16);
            }
            "vhost_user" => o.vhost_user = Some(switch("vhost_user", v)?),
            "vhost_mode" => {
                o.server = match v {
                    "client" => false,
                    "server" => true,
                    _ => {
                        return Err(OptionError::Invalid(format!(
                            "vhost_mode: '{v}' is not client or server"
                        )))
                    }
                }
            }
            "offload_tso" => o.tso = switch("offload_tso", v)?,
            "offload_ufo" => o.ufo = switch("offload_ufo", v)?,
            _ => o.csum = switch("offload_csum", v)?,
        }
    }
    let data_queues = common.num_queues.unwrap_or(2);
    if data_queues % 2 != 0 {
        return Err(OptionError::Invalid(format!(
            "num_queues: {data_queues} is odd; a NIC's queues come in receive and transmit pairs"
        )));
    }
    if o.mask.is_some() && o.ip.is_none() {
        return Err(OptionError::Invalid("mask= needs ip=".into()));
    }
    if o.mac.is_some_and(|m| !m.is_unicast()) {
        return Err(OptionError::Invalid(
            "mac: a multicast address cannot be an interface's".into(),
        ));
    }
    let pairs = data_queues / 2;
    let seed = default_mac_seed(&common, &o);
    let guest_mac = o
        .mac
        .unwrap_or_else(|| MacAddr::local_from(seed.as_bytes()));
    let backend = match (&common.socket, o.vhost_user) {
        (None, Some(true)) => {
            return Err(OptionError::Invalid(
                "vhost_user=true needs socket=PATH (the backend's)".into(),
            ))
        }
        (Some(_), Some(false)) => {
            return Err(OptionError::Invalid(
                "vhost_user=false with socket=: every cloister NIC is a vhost-user backend; \
                 leave socket= out for one cloister starts on a tap"
                    .into(),
            ))
        }
        (Some(socket), _) => {
            for (key, given) in [
                ("tap", o.tap.is_some()),
                ("ip", o.ip.is_some()),
                ("mask", o.mask.is_some()),
                ("host_mac", o.host_mac.is_some()),
            ] {
                if given {
                    return Err(OptionError::Invalid(format!(
                        "{key}= only applies when cloister starts the backend on a tap (the backend behind socket= has its own)"
                    )));
                }
            }
            if o.server {
                Backend::Listen(socket.clone())
            } else {
                Backend::Socket(socket.clone())
            }
        }
        (None, _) => {
            if o.server {
                return Err(OptionError::Invalid(
                    "vhost_mode=server needs socket=PATH: cloister listens there for the backend"
                        .into(),
                ));
            }
            // The tap's own address is stable too: a tap made again for a backend started
            // again keeps it, so the guest's ARP entry for the host stays good.
            let host_mac = o
                .host_mac
                .unwrap_or_else(|| MacAddr::local_from(format!("{seed}/host").as_bytes()));
            managed(&o, pairs, guest_mac, host_mac, seccomp)?
        }
    };
    let mut masked = 0;
    if !o.csum {
        // Without checksum offload, nothing that builds on it either (virtio 1.2, 5.1.3.1).
        masked |= bits(&[
            F_CSUM,
            F_GUEST_CSUM,
            F_GUEST_TSO4,
            F_GUEST_TSO6,
            F_GUEST_ECN,
            F_GUEST_UFO,
            F_GUEST_USO4,
            F_GUEST_USO6,
            F_HOST_TSO4,
            F_HOST_TSO6,
            F_HOST_ECN,
            F_HOST_UFO,
            F_HOST_USO,
            F_CTRL_GUEST_OFFLOADS,
        ]);
    }
    if !o.tso {
        masked |= bits(&[
            F_GUEST_TSO4,
            F_GUEST_TSO6,
            F_GUEST_ECN,
            F_HOST_TSO4,
            F_HOST_TSO6,
            F_HOST_ECN,
        ]);
    }
    if !o.ufo {
        masked |= bits(&[
            F_GUEST_UFO,
            F_HOST_UFO,
            F_GUEST_USO4,
            F_GUEST_USO6,
            F_HOST_USO,
        ]);
    }
    let queue_size = common.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
    Ok(DeviceSpec {
        option: OPTION,
        value: value.to_string(),
        id: common.id,
        kind: Arc::new(Net {
            backend: match &backend {
                Backend::Managed(_) => "vhost-user-net",
                _ => "vhost-user-net backend",
            },
            mac: guest_mac,
            mac_given: o.mac.is_some(),
            mtu: o.mtu,
            masked,
        }),
        backend,
        // The pairs, then the control queue (dropped if the backend has none).
        queue_sizes: vec![queue_size; usize::from(data_queues) + 1],
        transport: common.transport,
    })
}

#[derive(Debug)]
struct NetKeys {
    tap: Option<String>,
    ip: Option<Ipv4Addr>,
    mask: Option<Ipv4Addr>,
    mac: Option<MacAddr>,
    host_mac: Option<MacAddr>,
    mtu: Option<u16>,
    vhost_user: Option<bool>,
    server: bool,
    tso: bool,
    ufo: bool,
    csum: bool,
}

impl Default for NetKeys {
    fn default() -> Self {
        Self {
            tap: None,
            ip: None,
            mask: None,
            mac: None,
            host_mac: None,
            mtu: None,
            vhost_user: None,
            server: false,
            tso: true,
            ufo: true,
            csum: true,
        }
    }
}

/// What the default MAC is made from: the first of the id, the tap and the socket the user
/// named, and the NIC's rank among those of this process, so two otherwise identical `--net`
/// differ and the same command line gives the same addresses.
fn default_mac_seed(common: &CommonOptions, o: &NetKeys) -> String {
    static RANK: AtomicU32 = AtomicU32::new(0);
    let rank = RANK.fetch_add(1, Ordering::Relaxed);
    let name = common
        .id
        .clone()
        .or_else(|| o.tap.clone().filter(|t| !t.is_empty()))
        .or_else(|| common.socket.as_ref().map(|s| s.display().to_string()))
        .unwrap_or_default();
    format!("cloister-net/{name}/{rank}")
}

fn managed(
    o: &NetKeys,
    pairs: u16,
    guest_mac: MacAddr,
    host_mac: MacAddr,
    seccomp: SeccompMode,
) -> Result<Backend, OptionError> {
    let tap = o.tap.clone().unwrap_or_default();
    if tap.len() >= 16 || tap.contains('/') || tap.contains(char::is_whitespace) {
        return Err(OptionError::Invalid(format!(
            "tap: '{tap}' is not an interface name (at most 15 bytes, no '/' or spaces)"
        )));
    }
    let mut args = vec![
        Arg::socket("--socket="),
        Arg::plain(format!("--queues={pairs}")),
        Arg::plain(format!("--mac={guest_mac}")),
        Arg::plain("--log-level=warn"),
        Arg::plain(format!("--seccomp={}", seccomp.as_arg())),
    ];
    if let Some(mtu) = o.mtu {
        args.push(Arg::plain(format!("--mtu={mtu}")));
    }
    Ok(Backend::Managed(SpawnProfile {
        program: "vhost-user-net".into(),
        args,
        socket_suffix: String::new(),
        // The tap is the spawner's to open: nothing on the file system.
        paths: Vec::new(),
        tap: Some(TapRequest {
            name: tap,
            queues: pairs,
            interface: InterfaceConfig {
                ip: o.ip,
                mask: o.mask,
                mac: Some(host_mac),
                mtu: o.mtu,
            },
        }),
    }))
}

fn ipv4(key: &'static str, v: &str) -> Result<Ipv4Addr, OptionError> {
    v.parse()
        .map_err(|_| OptionError::Invalid(format!("{key}: '{v}' is not an IPv4 address")))
}

fn mac(key: &'static str, v: &str) -> Result<MacAddr, OptionError> {
    v.parse()
        .map_err(|e: String| OptionError::Invalid(format!("{key}: {e}")))
}

pub struct Net {
    backend: &'static str,
    mac: MacAddr,
    mac_given: bool,
    mtu: Option<u16>,
    /// Offloads the user turned off (`offload_tso=off` and the like).
    masked: u64,
}

impl Net {
    fn local_config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        c
    }
}

impl DeviceKind for Net {
    fn kind_name(&self) -> &'static str {
        "net"
    }

    /// A NIC's rings are returned in order (and a frame lost in a restart is just a lost
    /// frame): a new backend takes over from the used index.
    fn completes_in_order(&self) -> bool {
        true
    }

    fn backend_name(&self) -> &str {
        self.backend
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// Every virtio-net feature a backend implements by itself, control queue included (it
    /// is the backend's); not what needs the VMM (the VLAN filter and announcements we do not
    /// relay, RSS and hash reports, standby), and not the offloads the user turned off.
    fn device_features(&self) -> u64 {
        let all = bits(&[
            F_CSUM,
            F_GUEST_CSUM,
            F_CTRL_GUEST_OFFLOADS,
            F_MTU,
            F_MAC,
            F_GUEST_TSO4,
            F_GUEST_TSO6,
            F_GUEST_ECN,
            F_GUEST_UFO,
            F_HOST_TSO4,
            F_HOST_TSO6,
            F_HOST_ECN,
            F_HOST_UFO,
            F_MRG_RXBUF,
            F_STATUS,
            F_CTRL_VQ,
            F_CTRL_RX,
            F_CTRL_RX_EXTRA,
            F_MQ,
            F_CTRL_MAC_ADDR,
            F_GUEST_USO4,
            F_GUEST_USO6,
            F_HOST_USO,
        ]);
        all & !self.masked
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace::BackendOr(CONFIG_LEN as u32, self.local_config())
    }

    /// Our MAC and status when the config space is ours; the user's MTU whatever the
    /// backend says.
    fn local_features(&self, local_config: bool) -> u64 {
        let mut f = 0;
        if local_config {
            f |= 1 << F_MAC;
        }
        if local_config {
            f |= 1 << F_STATUS;
        }
        if self.mtu.is_some() {
            f |= 1 << F_MTU;
        }
        f
    }

    /// The control queue only with a backend that has exactly our pairs: its control queue
    /// is the one after its last pair, so with more pairs it would be one of their queues.
    fn usable_queues(&self, asked: usize, features: u64, available: u64) -> usize {
        if features & (1 << F_CTRL_VQ) != 0 && available == asked as u64 {
            asked
        } else {
            asked - 1
        }
    }

    fn required_queues(&self, asked: usize) -> usize {
        asked.saturating_sub(1).max(2)
    }

    fn adjust_features(&self, features: u64, queues: usize) -> u64 {
        if queues % 2 == 0 {
            features & !control_features()
        } else {
            features
        }
    }

    /// A backend with a config space of its own filters received frames on its MAC: the
    /// guest must have that one.
    fn check_backend_config(&self, config: &[u8]) -> Result<(), String> {
        let theirs = config.get(..6).and_then(|m| <[u8; 6]>::try_from(m).ok());
        match theirs {
            Some(theirs) if self.mac_given && theirs != self.mac.0 => Err(format!(
                "mac={}: the backend's NIC has {}, and receives for that one; give the backend this MAC (vhost-user-net --mac) or leave mac= out",
                self.mac,
                MacAddr(theirs)
            )),
            _ => Ok(()),
        }
    }

    fn adjust_config(&self, config: &mut [u8], queues: u16) {
        if config.len() < CONFIG_LEN {
            return;
        }
        config[8..10].copy_from_slice(&(queues / 2).max(1).to_le_bytes());
        if let Some(mtu) = self.mtu {
            config[10..12].copy_from_slice(&mtu.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(s: &str) -> DeviceSpec {
        parse(s, SeccompMode::True).unwrap()
    }

    fn err(s: &str) -> String {
        parse(s, SeccompMode::True).unwrap_err().to_string()
    }

    fn profile(d: &DeviceSpec) -> &SpawnProfile {
        match &d.backend {
            Backend::Managed(p) => p,
            other => panic!("not managed: {other:?}"),
        }
    }

    fn args(p: &SpawnProfile) -> Vec<String> {
        p.args
            .iter()
            .map(|a| match a {
                Arg::Plain(s) => s.clone(),
                Arg::Socket { before, after } => format!("{before}SOCKET{after}"),
            })
            .collect()
    }

    #[test]
    fn managed_on_a_tap() {
        let d = spec("tap=tap7,ip=192.168.4.1,mask=255.255.255.0,mac=02:00:00:00:00:07,host_mac=02:00:00:00:01:07,mtu=9000,num_queues=4,queue_size=512,id=eth1");
        assert_eq!(d.id.as_deref(), Some("eth1"));
        assert_eq!(
            d.queue_sizes,
            vec![512; 5],
            "4 queues and the control queue"
        );
        let p = profile(&d);
        assert_eq!(p.program, "vhost-user-net");
        let a = args(p);
        for expected in [
            "--socket=SOCKET",
            "--queues=2",
            "--mac=02:00:00:00:00:07",
            "--mtu=9000",
        ] {
            assert!(a.contains(&expected.to_string()), "{a:?}");
        }
        let tap = p.tap.as_ref().unwrap();
        assert_eq!(tap.name, "tap7");
        assert_eq!(tap.queues, 2);
        assert_eq!(tap.interface.ip, Some(Ipv4Addr::new(192, 168, 4, 1)));
        assert_eq!(tap.interface.mtu, Some(9000));
        assert_eq!(
            tap.interface.mac.map(|m| m.to_string()).as_deref(),
            Some("02:00:00:00:01:07")
        );
    }

    #[test]
    fn defaults_and_operator_modes() {
        let d = spec("tap=");
        assert_eq!(d.queue_sizes, vec![DEFAULT_QUEUE_SIZE; 3]);
        assert_eq!(
            profile(&d).tap.as_ref().unwrap().name,
            "",
            "the kernel picks"
        );
        let d = spec("socket=/run/n.sock");
        assert_eq!(d.backend, Backend::Socket(PathBuf::from("/run/n.sock")));
        let d = spec("vhost_user=true,socket=/run/n.sock,vhost_mode=server");
        assert_eq!(d.backend, Backend::Listen(PathBuf::from("/run/n.sock")));
        let d = spec("vhost_user=on,socket=/s,vhost_mode=client,mac=02:00:00:00:00:01");
        assert_eq!(d.backend, Backend::Socket(PathBuf::from("/s")));
    }

    #[test]
    fn default_macs_are_local_unicast_and_differ() {
        let a = spec("tap=a");
        let b = spec("tap=a");
        let mac = |d: &DeviceSpec| {
            args(profile(d))
                .into_iter()
                .find_map(|s| s.strip_prefix("--mac=").map(str::to_owned))
                .unwrap()
        };
        let (ma, mb) = (mac(&a), mac(&b));
        assert_ne!(ma, mb, "two NICs, two addresses");
        let first: u8 = u8::from_str_radix(&ma[..2], 16).unwrap();
        assert_eq!(first & 3, 2, "{ma}: locally administered, unicast");
        // The tap's side has one too, which a tap made again keeps; a given one is kept.
        let host = |d: &DeviceSpec| profile(d).tap.as_ref().unwrap().interface.mac.unwrap();
        let h = host(&a).to_string();
        assert_ne!(h, ma);
        assert_eq!(u8::from_str_radix(&h[..2], 16).unwrap() & 3, 2, "{h}");
        assert_eq!(
            host(&spec("tap=c,host_mac=02:00:00:00:01:07")).to_string(),
            "02:00:00:00:01:07"
        );
    }

    #[test]
    fn mistakes_are_named() {
        assert!(err("num_queues=3").contains("odd"));
        assert!(err("num_queues=64").contains("num_queues"));
        assert!(err("mac=01:00:00:00:00:01").contains("multicast"));
        assert!(err("mac=zz").contains("mac"));
        assert!(err("ip=300.1.1.1").contains("not an IPv4 address"));
        assert!(err("mask=255.0.0.0").contains("mask= needs ip="));
        assert!(err("mtu=10").contains("mtu"));
        assert!(err("tap=a-name-much-too-long").contains("interface name"));
        assert!(err("socket=/s,tap=t").contains("tap= only applies"));
        assert!(err("vhost_user=true").contains("needs socket="));
        assert!(err("vhost_user=false,socket=/s").contains("vhost_user=false"));
        assert!(err("vhost_mode=server").contains("needs socket="));
        assert!(err("vhost_mode=sideways,socket=/s").contains("client or server"));
        assert!(err("offload_tso=maybe").contains("offload_tso"));
        assert!(err("bogus=1").contains("bogus"));
    }

    #[test]
    fn the_control_queue_and_what_needs_it_go_with_a_backend_without_one() {
        let d = spec("socket=/s,num_queues=4");
        let k = &d.kind;
        assert_eq!(k.required_queues(5), 4);
        let with_ctrl = 1 << F_CTRL_VQ;
        assert_eq!(k.usable_queues(5, with_ctrl, 5), 5);
        assert_eq!(k.usable_queues(5, with_ctrl, 4), 4);
        assert_eq!(
            k.usable_queues(5, with_ctrl, 9),
            4,
            "a backend with more pairs"
        );
        assert_eq!(k.usable_queues(5, 0, 9), 4);
        let f = k.device_features();
        assert_eq!(k.adjust_features(f, 4) & control_features(), 0);
        assert_eq!(k.adjust_features(f, 5), f);
        let mut config = vec![0u8; CONFIG_LEN];
        k.adjust_config(&mut config, 5);
        assert_eq!(u16::from_le_bytes([config[8], config[9]]), 2);
    }

    #[test]
    fn offloads_turned_off_are_not_offered() {
        let all = spec("socket=/s").kind.device_features();
        let no_tso = spec("socket=/s,offload_tso=off").kind.device_features();
        assert_eq!(no_tso & (1 << F_HOST_TSO4 | 1 << F_GUEST_TSO4), 0);
        assert_ne!(no_tso & (1 << F_CSUM), 0);
        let no_csum = spec("socket=/s,offload_csum=off").kind.device_features();
        assert_eq!(
            no_csum & (1 << F_CSUM | 1 << F_GUEST_CSUM | 1 << F_HOST_TSO6),
            0
        );
        assert_ne!(all & (1 << F_HOST_TSO4), 0);
    }

    #[test]
    fn local_features_are_what_the_config_space_of_ours_holds() {
        let k = spec("socket=/s").kind;
        assert_eq!(k.local_features(false), 0);
        assert_eq!(k.local_features(true), 1 << F_MAC | 1 << F_STATUS);
        let k = spec("socket=/s,mac=02:00:00:00:00:01,mtu=1400").kind;
        assert_eq!(k.local_features(false), 1 << F_MTU);
        let mut config = vec![0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        k.adjust_config(&mut config, 3);
        assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
        // The backend's own MAC must be the one asked for.
        assert!(k.check_backend_config(&config).is_ok());
        config[5] = 9;
        let e = k.check_backend_config(&config).unwrap_err();
        assert!(e.contains("the backend's NIC has 02:00:00:00:00:09"), "{e}");
        assert!(spec("socket=/s").kind.check_backend_config(&config).is_ok());
    }
}
