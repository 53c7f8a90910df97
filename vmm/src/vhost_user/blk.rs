//! What is specific to virtio-blk: its device type, the feature bits we let through, and its
//! config space.

use super::DeviceKind;

pub const DEVICE_TYPE: u32 = 2;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding. Later fields
/// (secure erase, zoned) belong to features we never pass, so drivers do not read them.
pub const CONFIG_LEN: u32 = 60;
/// `num_queues` (le16) in the config space.
const NUM_QUEUES_OFFSET: usize = 34;

const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_GEOMETRY: u32 = 4;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_TOPOLOGY: u32 = 10;
const F_MQ: u32 = 12;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;

pub struct Blk;

impl DeviceKind for Blk {
    fn backend_name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// Block features whose config fields and semantics we pass through unchanged. Left out:
    /// CONFIG_WCE (its config field is writable, and we refuse config writes), LIFETIME,
    /// SECURE_ERASE and ZONED (fields past [`CONFIG_LEN`]).
    fn device_features(&self) -> u64 {
        [
            F_SIZE_MAX,
            F_SEG_MAX,
            F_GEOMETRY,
            F_RO,
            F_BLK_SIZE,
            F_FLUSH,
            F_TOPOLOGY,
            F_MQ,
            F_DISCARD,
            F_WRITE_ZEROES,
        ]
        .iter()
        .fold(0, |acc, f| acc | (1 << f))
    }

    fn config_len(&self) -> u32 {
        CONFIG_LEN
    }

    /// The guest must see as many queues as we expose, which can be fewer than the backend
    /// serves (operator-launched backends).
    fn adjust_config(&self, config: &mut [u8], queues: u16) {
        if let Some(field) = config.get_mut(NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2) {
            field.copy_from_slice(&queues.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_queues_is_patched() {
        let mut c = vec![0xffu8; CONFIG_LEN as usize];
        Blk.adjust_config(&mut c, 3);
        assert_eq!(&c[34..36], &[3, 0]);
        assert_eq!(c[33], 0xff);
        assert_eq!(c[36], 0xff);
        let mut short = vec![0u8; 10];
        Blk.adjust_config(&mut short, 3);
        assert_eq!(short, vec![0u8; 10]);
    }

    #[test]
    fn features_are_block_bits_only() {
        let f = Blk.device_features();
        assert_eq!(f >> 24, 0, "no transport or vhost-user bits");
        assert_ne!(f & (1 << F_MQ), 0);
        assert_eq!(f & (1 << 11), 0, "no CONFIG_WCE");
    }
}
