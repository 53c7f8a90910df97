//! What the device tells the driver: feature bits and the `virtio_blk_config` space.

use std::mem::{offset_of, size_of};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::disk::SECTOR_SIZE;

/// Most ranges one DISCARD or WRITE_ZEROES request may carry (each is one fallocate).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest range of one discard or write-zeroes segment, in sectors (u32 in the protocol; this
/// bounds how long one fallocate can keep a queue's worker busy with the sync engine).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22; // 2 GiB

/// The geometry of the disk as the driver sees it.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub capacity_bytes: u64,
    /// Logical block size the driver should use (at least 512).
    pub block_size: u32,
    pub queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
}

impl Geometry {
    /// Largest number of data segments per request: leaves room for the header and status
    /// descriptors in a ring of `queue_size` (the same rule QEMU applies).
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }
}

fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// Virtio feature bits offered to the driver.
pub fn features(geometry: &Geometry) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        // Offered even with one queue, so `num_queues` in the config space always counts.
        | bit(VIRTIO_BLK_F_MQ)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if geometry.readonly {
        features |= bit(VIRTIO_BLK_F_RO);
    } else {
        features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

/// vhost-user protocol features (all of them implemented by `vhost-user-backend`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The whole `virtio_blk_config` structure, little-endian.
pub fn config_space(geometry: &Geometry) -> Vec<u8> {
    let mut space = vec![0u8; size_of::<virtio_blk_config>()];
    let mut put = |offset: usize, bytes: &[u8]| {
        space[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    let block = geometry.block_size.max(SECTOR_SIZE as u32);
    put(
        offset_of!(virtio_blk_config, capacity),
        &(geometry.capacity_bytes / SECTOR_SIZE).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &geometry.seg_max().to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &block.to_le_bytes(),
    );
    // Topology: physical block = logical block, no alignment offset, minimum I/O of one block,
    // no preferred I/O size.
    put(offset_of!(virtio_blk_config, physical_block_exp), &[0]);
    put(offset_of!(virtio_blk_config, alignment_offset), &[0]);
    put(
        offset_of!(virtio_blk_config, min_io_size),
        &1u16.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, num_queues),
        &geometry.queues.to_le_bytes(),
    );
    if !geometry.readonly {
        let sectors = MAX_DISCARD_SECTORS.to_le_bytes();
        let segments = MAX_DISCARD_SEGMENTS.to_le_bytes();
        put(offset_of!(virtio_blk_config, max_discard_sectors), &sectors);
        put(offset_of!(virtio_blk_config, max_discard_seg), &segments);
        put(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &(block / SECTOR_SIZE as u32).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            &sectors,
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &segments,
        );
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    }
    space
}

/// The part of the config space a GET_CONFIG asks for; empty (an error for the frontend) if the
/// range is outside the structure.
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = offset as usize;
    match start.checked_add(size as usize) {
        Some(end) if end <= space.len() => space[start..end].to_vec(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(readonly: bool) -> Geometry {
        Geometry {
            capacity_bytes: 1 << 30,
            block_size: 512,
            queues: 4,
            queue_size: 256,
            readonly,
        }
    }

    #[test]
    fn config_space_layout() {
        let space = config_space(&geometry(false));
        let u64_at = |o: usize| u64::from_le_bytes(space[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(space[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(space[o..o + 2].try_into().unwrap());
        assert_eq!(u64_at(0), (1 << 30) / 512);
        assert_eq!(u32_at(12), 254); // seg_max
        assert_eq!(u32_at(20), 512); // blk_size
        assert_eq!(u16_at(34), 4); // num_queues
        assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(40), MAX_DISCARD_SEGMENTS);
        assert_eq!(space[56], 1); // write_zeroes_may_unmap
        assert!(config_slice(&space, 0, 8).len() == 8);
        assert!(config_slice(&space, space.len() as u32, 1).is_empty());
        assert!(config_slice(&space, u32::MAX, 2).is_empty());
    }

    #[test]
    fn readonly_features() {
        let ro = features(&geometry(true));
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & bit(VIRTIO_BLK_F_DISCARD), 0);
        let rw = features(&geometry(false));
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(rw & bit(VIRTIO_BLK_F_MQ), 0);
    }
}
