//! The device-wide state the driver changes: negotiated features (and so the header length and
//! the tap's offloads), the receive filter, the guest's MAC, the queue pairs in use.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use cloister_tap::{MacAddr, Offloads, TapQueue};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MRG_RXBUF};

use crate::filter::RxFilter;
use crate::virtio::{self, bit, Identity};

pub struct DeviceState {
    pub identity: Identity,
    acked: AtomicU64,
    /// The offloads the tap applies to frames for the guest (TUNSETOFFLOAD's last value);
    /// all bits while unknown (before SET_FEATURES, or after a failed TUNSETOFFLOAD).
    rx_offloads: AtomicU32,
    filter: RwLock<RxFilter>,
    taps: Vec<Arc<TapQueue>>,
}

impl DeviceState {
    pub fn new(identity: Identity, taps: Vec<Arc<TapQueue>>) -> Self {
        Self {
            filter: RwLock::new(RxFilter::new(identity.mac)),
            identity,
            acked: AtomicU64::new(0),
            rx_offloads: AtomicU32::new(u32::MAX),
            taps,
        }
    }

    pub fn header_len(&self) -> usize {
        virtio::header_len(self.acked.load(Ordering::Acquire))
    }

    pub fn mergeable_rx(&self) -> bool {
        self.acked.load(Ordering::Acquire) & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// The longest frame, header included, the tap can hand over: a GSO frame of 64 KiB once
    /// the guest takes segmentation offloads, else one of the MTU; both with a VLAN tag.
    pub fn max_rx_frame(&self) -> usize {
        const SEGMENTING: u32 =
            Offloads::TSO4 | Offloads::TSO6 | Offloads::UFO | Offloads::USO4 | Offloads::USO6;
        let payload = if self.rx_offloads.load(Ordering::Acquire) & SEGMENTING != 0 {
            usize::from(u16::MAX)
        } else {
            usize::from(self.identity.mtu)
        };
        self.header_len() + 14 + 4 + payload
    }

    pub fn filter<T>(&self, f: impl FnOnce(&RxFilter) -> T) -> T {
        f(&self.filter.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn update_filter(&self, f: impl FnOnce(&mut RxFilter)) {
        f(&mut self.filter.write().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn config_space(&self) -> [u8; virtio::CONFIG_LEN] {
        virtio::config_space(&self.identity, self.filter(|f| f.mac))
    }

    /// SET_FEATURES: the header length the tap adds and expects, and the offloads the guest
    /// takes.
    pub fn set_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        let Some(tap) = self.taps.first() else { return };
        // Both are per device, not per queue: the first queue's descriptor sets them.
        if let Err(e) = tap.set_vnet_hdr_len(virtio::header_len(features) as i32) {
            log::error!("{e}");
        }
        self.set_offloads(virtio::offloads_for(features));
    }

    /// VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, or what SET_FEATURES implies.
    pub fn set_offloads(&self, offloads: Offloads) {
        let wanted = Offloads(offloads.0 & self.identity.tap_offloads.0);
        if let Some(tap) = self.taps.first() {
            match tap.set_offloads(wanted) {
                Ok(()) => {
                    self.rx_offloads.store(wanted.0, Ordering::Release);
                    log::debug!("tap offloads {:#x}", wanted.0)
                }
                Err(e) => {
                    self.rx_offloads.store(u32::MAX, Ordering::Release);
                    log::error!("{e}")
                }
            }
        }
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (and 1 at every reset): the tap steers frames to the
    /// first `pairs` queues only, the ones the driver serves.
    pub fn set_active_pairs(&self, pairs: usize) -> bool {
        let mut ok = true;
        for (i, tap) in self.taps.iter().enumerate() {
            if !tap.multi_queue() {
                continue;
            }
            if let Err(e) = tap.set_attached(i < pairs) {
                log::warn!("queue pair {i}: {e}");
                ok = false;
            }
        }
        ok
    }

    /// SET_VRING_ENABLE for ring `index`. Without a control queue the driver cannot set the
    /// queue pairs (its frontend handles the control queue, as QEMU does) and the frontend
    /// enables the rings of the pairs in use: a pair's tap queue follows its receive ring. The
    /// first pair's stays attached; with our control queue, VQ_PAIRS_SET decides.
    pub fn ring_enabled(&self, index: usize, enabled: bool) {
        if self.acked.load(Ordering::Acquire) & bit(VIRTIO_NET_F_CTRL_VQ) != 0 || index % 2 != 0 {
            return;
        }
        let pair = index / 2;
        let Some(tap) = self.taps.get(pair).filter(|t| pair > 0 && t.multi_queue()) else {
            return;
        };
        match tap.set_attached(enabled) {
            Ok(()) => log::debug!("queue pair {pair}: tap queue attached: {enabled}"),
            Err(e) => log::warn!("queue pair {pair}: {e}"),
        }
    }

    /// A device reset or a new connection: as the device starts.
    pub fn reset(&self) {
        self.acked.store(0, Ordering::Release);
        self.rx_offloads.store(u32::MAX, Ordering::Release);
        self.update_filter(|f| *f = RxFilter::new(self.identity.mac));
        self.set_active_pairs(1);
    }

    pub fn set_mac(&self, mac: MacAddr) {
        self.update_filter(|f| f.mac = mac);
    }
}
