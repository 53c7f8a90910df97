//! The receive filter the driver sets through the control queue (VIRTIO_NET_CTRL_RX and
//! VIRTIO_NET_CTRL_MAC): a tap hands us every frame its bridge sends it, so frames the guest
//! did not ask for are dropped here, as a NIC would, before they cost the guest a buffer.

use cloister_tap::MacAddr;

const BROADCAST: [u8; 6] = [0xff; 6];

/// What the guest accepts. Until the driver says otherwise, everything (as QEMU starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    pub mac: MacAddr,
    pub promisc: bool,
    pub all_multi: bool,
    pub all_uni: bool,
    pub no_multi: bool,
    pub no_uni: bool,
    pub no_bcast: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl RxFilter {
    pub fn new(mac: MacAddr) -> Self {
        Self {
            mac,
            promisc: true,
            all_multi: false,
            all_uni: false,
            no_multi: false,
            no_uni: false,
            no_bcast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }

    /// Whether a frame to `dest` reaches the guest.
    pub fn accepts(&self, dest: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        let Ok(dest) = <[u8; 6]>::try_from(dest) else {
            return false;
        };
        if dest == BROADCAST {
            return !self.no_bcast;
        }
        if dest[0] & 1 != 0 {
            return !self.no_multi && (self.all_multi || self.multicast.contains(&dest));
        }
        !self.no_uni && (self.all_uni || dest == self.mac.0 || self.unicast.contains(&dest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nic_filter() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut f = RxFilter::new(mac);
        assert!(f.accepts(&[2, 9, 9, 9, 9, 9]), "promiscuous until told");
        f.promisc = false;
        assert!(f.accepts(&mac.0));
        assert!(!f.accepts(&[2, 9, 9, 9, 9, 9]));
        assert!(f.accepts(&BROADCAST));
        let mcast = [0x33, 0x33, 0, 0, 0, 1];
        assert!(!f.accepts(&mcast));
        f.multicast.push(mcast);
        assert!(f.accepts(&mcast));
        f.unicast.push([2, 9, 9, 9, 9, 9]);
        assert!(f.accepts(&[2, 9, 9, 9, 9, 9]));
        f.no_bcast = true;
        assert!(!f.accepts(&BROADCAST));
        f.all_multi = true;
        assert!(f.accepts(&[0x01, 0, 0x5e, 0, 0, 9]));
        f.no_uni = true;
        assert!(!f.accepts(&mac.0));
        assert!(!f.accepts(&[1, 2, 3]), "short frame");
    }
}
