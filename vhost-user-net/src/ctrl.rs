//! The control queue: what Linux sends there (receive modes, MAC tables and address, the number
//! of queue pairs, guest offloads), handled here so the VMM stays out of it.

use std::time::Duration;

use cloister_backends::logging::RateLimit;
use cloister_backends::server::GuestMemory;
use cloister_tap::MacAddr;
use vhost_user_backend::{VringState, VringT};
use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use crate::pair::Vring;
use crate::state::DeviceState;
use crate::virtio;

/// Longest command accepted: a MAC table of a few hundred entries.
const MAX_COMMAND: usize = 16 * 1024;

pub struct ControlQueue {
    errors: RateLimit,
}

impl Default for ControlQueue {
    fn default() -> Self {
        Self {
            errors: RateLimit::new(Duration::from_secs(1)),
        }
    }
}

impl ControlQueue {
    pub fn serve(&mut self, vring: &Vring, mem: &GuestMemory, device: &DeviceState) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        loop {
            if !self.answer_all(&mut state, mem, device) {
                // An available ring we cannot read: nothing more until the driver resets.
                return;
            }
            // Re-arm (with EVENT_IDX the driver kicks only at the index asked for); a command
            // that came meanwhile is answered now.
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("control queue: {e}");
                    break;
                }
            }
        }
    }

    /// Answers every command waiting; false if the available ring cannot be read.
    fn answer_all(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
        mem: &GuestMemory,
        device: &DeviceState,
    ) -> bool {
        let mut answered = Vec::new();
        let chains = match state.get_queue_mut().iter(mem) {
            Ok(chains) => chains,
            Err(e) => {
                log::warn!("control queue: {e}");
                return false;
            }
        };
        {
            for chain in chains {
                let head = chain.head_index();
                let mut command = Vec::new();
                let mut ack: Option<GuestAddress> = None;
                let mut malformed = false;
                for desc in chain {
                    if desc.is_write_only() {
                        ack.get_or_insert(desc.addr());
                        continue;
                    }
                    let len = desc.len() as usize;
                    if ack.is_some() || command.len() + len > MAX_COMMAND {
                        malformed = true;
                        break;
                    }
                    let start = command.len();
                    command.resize(start + len, 0);
                    if mem.read_slice(&mut command[start..], desc.addr()).is_err() {
                        malformed = true;
                        break;
                    }
                }
                let status = if malformed {
                    VIRTIO_NET_ERR
                } else {
                    self.apply(&command, device)
                };
                let used = match ack {
                    Some(addr) if mem.write_obj(status as u8, addr).is_ok() => 1,
                    _ => 0,
                };
                answered.push((head, used));
            }
        }
        for (head, used) in answered {
            let _ = state.add_used(head, used);
        }
        if state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
        true
    }

    /// Carries out one command; the status byte for the driver.
    fn apply(&mut self, command: &[u8], device: &DeviceState) -> u32 {
        let (Some(&class), Some(&cmd)) = (command.first(), command.get(1)) else {
            return VIRTIO_NET_ERR;
        };
        let data = &command[2..];
        let ok = match class as u32 {
            VIRTIO_NET_CTRL_RX => rx_mode(cmd as u32, data, device),
            VIRTIO_NET_CTRL_MAC => mac(cmd as u32, data, device),
            VIRTIO_NET_CTRL_MQ if cmd as u32 == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET => {
                match data.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]])) {
                    Some(pairs) if pairs >= 1 && pairs <= device.identity.queue_pairs => {
                        log::info!("the driver uses {pairs} queue pair(s)");
                        device.set_active_pairs(pairs.into())
                    }
                    _ => false,
                }
            }
            VIRTIO_NET_CTRL_GUEST_OFFLOADS if cmd as u32 == VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET => {
                match data.get(..8) {
                    Some(b) => {
                        let bits = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                        device.set_offloads(virtio::offloads_for(bits));
                        true
                    }
                    None => false,
                }
            }
            // Announcements need VIRTIO_NET_F_GUEST_ANNOUNCE, VLAN filtering CTRL_VLAN: not
            // offered.
            _ => false,
        };
        if ok {
            VIRTIO_NET_OK
        } else {
            if let Some(suppressed) = self.errors.check() {
                log::warn!(
                    "control queue: command {class}.{cmd} refused ({suppressed} similar suppressed)"
                );
            }
            VIRTIO_NET_ERR
        }
    }
}

fn rx_mode(cmd: u32, data: &[u8], device: &DeviceState) -> bool {
    let Some(&on) = data.first() else {
        return false;
    };
    let on = on != 0;
    let mut known = true;
    device.update_filter(|f| match cmd {
        VIRTIO_NET_CTRL_RX_PROMISC => f.promisc = on,
        VIRTIO_NET_CTRL_RX_ALLMULTI => f.all_multi = on,
        VIRTIO_NET_CTRL_RX_ALLUNI => f.all_uni = on,
        VIRTIO_NET_CTRL_RX_NOMULTI => f.no_multi = on,
        VIRTIO_NET_CTRL_RX_NOUNI => f.no_uni = on,
        VIRTIO_NET_CTRL_RX_NOBCAST => f.no_bcast = on,
        _ => known = false,
    });
    known
}

fn mac(cmd: u32, data: &[u8], device: &DeviceState) -> bool {
    match cmd {
        VIRTIO_NET_CTRL_MAC_ADDR_SET => match <[u8; 6]>::try_from(data.get(..6).unwrap_or(&[])) {
            Ok(mac) if MacAddr(mac).is_unicast() => {
                device.set_mac(MacAddr(mac));
                true
            }
            _ => false,
        },
        VIRTIO_NET_CTRL_MAC_TABLE_SET => {
            // Two tables, each a 32-bit count and that many addresses: unicast, then multicast.
            let Some((unicast, rest)) = mac_table(data) else {
                return false;
            };
            let Some((multicast, _)) = mac_table(rest) else {
                return false;
            };
            device.update_filter(|f| {
                f.unicast = unicast;
                f.multicast = multicast;
            });
            true
        }
        _ => false,
    }
}

fn mac_table(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let end = count.checked_mul(6)?.checked_add(4)?;
    let bytes = data.get(4..end)?;
    let table = bytes
        .chunks_exact(6)
        .filter_map(|c| c.try_into().ok())
        .collect();
    Some((table, &data[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_tables_parse_and_bad_counts_fail() {
        let mut data = 1u32.to_le_bytes().to_vec();
        data.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
        data.extend_from_slice(&2u32.to_le_bytes());
        data.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1, 1, 0, 0x5e, 0, 0, 1]);
        let (uni, rest) = mac_table(&data).unwrap();
        assert_eq!(uni, vec![[2, 0, 0, 0, 0, 9]]);
        let (multi, rest) = mac_table(rest).unwrap();
        assert_eq!(multi.len(), 2);
        assert!(rest.is_empty());
        assert!(mac_table(&u32::MAX.to_le_bytes()).is_none());
        assert!(mac_table(&[1, 0]).is_none());
    }
}
