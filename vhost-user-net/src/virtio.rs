//! What the device tells the driver: feature bits, the `virtio_net_config` space, and the
//! header that starts every frame.

use cloister_tap::{MacAddr, Offloads};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// Bytes of `virtio_net_config` we fill: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;

/// What the device is, as the driver sees it.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub mac: MacAddr,
    pub mtu: u16,
    pub queue_pairs: u16,
    /// What the tap accepts with TUNSETOFFLOAD: frames of these kinds may go to the guest.
    pub tap_offloads: Offloads,
}

/// Virtio feature bits offered to the driver.
pub fn features(id: &Identity) -> u64 {
    let o = id.tap_offloads;
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        // The guest's own frames: a tap with IFF_VNET_HDR takes partial checksums and GSO
        // frames (TCP, and UDP where the kernel has it) and finishes them.
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if o.has(Offloads::UFO) {
        features |= bit(VIRTIO_NET_F_HOST_UFO);
    }
    if o.has(Offloads::USO4 | Offloads::USO6) {
        features |= bit(VIRTIO_NET_F_HOST_USO);
    }
    // Frames for the guest: only the kinds the tap can be told to pass on.
    if o.has(Offloads::CSUM) {
        features |= bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
        for (offload, feature) in [
            (Offloads::TSO4, VIRTIO_NET_F_GUEST_TSO4),
            (Offloads::TSO6, VIRTIO_NET_F_GUEST_TSO6),
            (Offloads::TSO_ECN, VIRTIO_NET_F_GUEST_ECN),
            (Offloads::UFO, VIRTIO_NET_F_GUEST_UFO),
            (Offloads::USO4, VIRTIO_NET_F_GUEST_USO4),
            (Offloads::USO6, VIRTIO_NET_F_GUEST_USO6),
        ] {
            if o.has(offload) {
                features |= bit(feature);
            }
        }
    }
    if id.queue_pairs > 1 {
        features |= bit(VIRTIO_NET_F_MQ);
    }
    features
}

/// The offloads to set on the tap for the GUEST_* features in `features` (acked, or the
/// guest's CTRL_GUEST_OFFLOADS choice).
pub fn offloads_for(features: u64) -> Offloads {
    let mut o = 0;
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        o |= Offloads::CSUM;
        for (feature, offload) in [
            (VIRTIO_NET_F_GUEST_TSO4, Offloads::TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, Offloads::TSO6),
            (VIRTIO_NET_F_GUEST_ECN, Offloads::TSO_ECN),
            (VIRTIO_NET_F_GUEST_UFO, Offloads::UFO),
            (VIRTIO_NET_F_GUEST_USO4, Offloads::USO4),
            (VIRTIO_NET_F_GUEST_USO6, Offloads::USO6),
        ] {
            if features & bit(feature) != 0 {
                o |= offload;
            }
        }
    }
    Offloads(o)
}

/// The length of the virtio-net header: 12 bytes (with `num_buffers`) for VERSION_1 or
/// MRG_RXBUF drivers, 10 for legacy ones.
pub fn header_len(features: u64) -> usize {
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        12
    } else {
        10
    }
}

/// vhost-user protocol features (all of them implemented by `vhost-user-backend`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// `virtio_net_config` up to `mtu`, little-endian, with the link up.
pub fn config_space(id: &Identity, mac: MacAddr) -> [u8; CONFIG_LEN] {
    let mut space = [0u8; CONFIG_LEN];
    space[..6].copy_from_slice(&mac.0);
    space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    space[8..10].copy_from_slice(&id.queue_pairs.to_le_bytes());
    space[10..12].copy_from_slice(&id.mtu.to_le_bytes());
    space
}

/// `size` bytes of `space` from `offset`; what lies past its end reads as zeroes.
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(space.len());
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(offloads: u32, pairs: u16) -> Identity {
        Identity {
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            queue_pairs: pairs,
            tap_offloads: Offloads(offloads),
        }
    }

    #[test]
    fn guest_offloads_follow_the_tap() {
        let none = features(&id(0, 1));
        assert_eq!(none & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
        assert_eq!(none & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(none & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(none & bit(VIRTIO_NET_F_HOST_TSO4), 0);
        let all = Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6 | Offloads::TSO_ECN;
        let f = features(&id(all, 4));
        for feature in [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_MQ,
        ] {
            assert_ne!(f & bit(feature), 0, "feature {feature}");
        }
        assert_eq!(f & bit(VIRTIO_NET_F_GUEST_UFO), 0);
        assert_eq!(offloads_for(f), Offloads(all));
        // Segmentation without checksums is not a combination the tap takes.
        assert_eq!(offloads_for(bit(VIRTIO_NET_F_GUEST_TSO4)), Offloads(0));
    }

    #[test]
    fn config_space_layout() {
        let space = config_space(&id(0, 2), MacAddr([2, 1, 2, 3, 4, 5]));
        assert_eq!(&space[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([space[6], space[7]]), 1);
        assert_eq!(u16::from_le_bytes([space[8], space[9]]), 2);
        assert_eq!(u16::from_le_bytes([space[10], space[11]]), 1500);
        assert_eq!(config_slice(&space, 10, 4), vec![0xdc, 0x05, 0, 0]);
        assert_eq!(config_slice(&space, 100, 2), vec![0, 0]);
        assert_eq!(header_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(header_len(0), 10);
    }
}
