//! The VMM side of vhost-user: connect, negotiate, share memory, hand over virtqueues.

use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

use super::memory::GuestRam;
use super::virtqueue::SplitQueue;
use super::{Error, Result};

/// What was agreed with the backend.
#[derive(Debug, Clone, Copy)]
pub struct Negotiation {
    /// Virtio features offered by the backend.
    pub offered: u64,
    /// Virtio features acknowledged (offered ∩ wanted, plus PROTOCOL_FEATURES if offered).
    pub acked: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queues: u64,
}

impl Negotiation {
    pub fn has(&self, feature: u32) -> bool {
        self.acked & (1u64 << feature) != 0
    }
}

/// A live vhost-user connection.
pub struct Connection {
    frontend: Frontend,
    negotiation: Negotiation,
}

impl Connection {
    /// Connects to `socket`, negotiates `wanted` virtio features and the protocol features we
    /// use (MQ, CONFIG, REPLY_ACK), and shares `ram`.
    pub fn connect(socket: &Path, ram: &GuestRam, wanted: u64, queues: usize) -> Result<Self> {
        let frontend = Frontend::connect(socket, queues as u64)?;
        Self::negotiate(frontend, ram, wanted, queues)
    }

    /// [`Connection::connect`] on a backend that connected to us (its client mode).
    pub fn from_stream(
        stream: UnixStream,
        ram: &GuestRam,
        wanted: u64,
        queues: usize,
    ) -> Result<Self> {
        Self::negotiate(
            Frontend::from_stream(stream, queues as u64),
            ram,
            wanted,
            queues,
        )
    }

    fn negotiate(
        mut frontend: Frontend,
        ram: &GuestRam,
        wanted: u64,
        queues: usize,
    ) -> Result<Self> {
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let acked = offered & (wanted | protocol_bit);
        frontend.set_features(acked)?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut available_queues = 1;
        if offered & protocol_bit != 0 {
            let offered_protocol = frontend.get_protocol_features()?;
            protocol = offered_protocol
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
            frontend.set_protocol_features(protocol)?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request waits for its ack, so a request the backend refuses
                // fails right there instead of closing the connection under a later one.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                available_queues = frontend.get_queue_num()?;
            }
        }
        if (available_queues as usize) < queues {
            return Err(Error::TooFewQueues {
                available: available_queues,
                wanted: queues,
            });
        }
        frontend.set_mem_table(&ram.regions()?)?;
        Ok(Self {
            frontend,
            negotiation: Negotiation {
                offered,
                acked,
                protocol,
                queues: available_queues,
            },
        })
    }

    pub fn negotiation(&self) -> Negotiation {
        self.negotiation
    }

    /// Hands `queue` to the backend as queue `index` and enables it.
    pub fn start_queue(&mut self, index: usize, ram: &GuestRam, queue: &SplitQueue) -> Result<()> {
        self.start_queue_at(index, ram, queue, 0)
    }

    /// [`Connection::start_queue`] for a ring already in use: the backend reads the available
    /// ring from `base`.
    pub fn start_queue_at(
        &mut self,
        index: usize,
        ram: &GuestRam,
        queue: &SplitQueue,
        base: u16,
    ) -> Result<()> {
        let (desc, avail, used) = queue.addresses();
        let config = VringConfigData {
            queue_max_size: queue.size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: ram.host_address(desc)?,
            used_ring_addr: ram.host_address(used)?,
            avail_ring_addr: ram.host_address(avail)?,
            log_addr: None,
        };
        self.frontend.set_vring_num(index, queue.size())?;
        self.frontend.set_vring_addr(index, &config)?;
        self.frontend.set_vring_base(index, base)?;
        self.frontend.set_vring_call(index, &queue.call)?;
        self.frontend.set_vring_kick(index, &queue.kick)?;
        if self.negotiation.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.frontend.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    /// GET_VRING_BASE: stops queue `index` (the backend finishes what it took) and returns the
    /// next avail index it would have read.
    pub fn stop_queue(&mut self, index: usize) -> Result<u32> {
        Ok(self.frontend.get_vring_base(index)?)
    }

    /// `size` bytes of the device's config space from `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) =
            self.frontend
                .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)?;
        Ok(payload)
    }

    /// The underlying frontend, for protocol tests.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}
