//! A vhost-user frontend and a split-virtqueue guest driver in one process, for testing and
//! loading backends on a host that cannot boot a guest.
//!
//! [`GuestRam`] is memfd-backed "guest memory" shared with the backend through
//! `SET_MEM_TABLE`; [`SplitQueue`] lays a virtqueue out in it and drives it as a guest driver
//! would (descriptors, avail ring, kicks, used ring, EVENT_IDX); [`Connection`] is the VMM side
//! of the vhost-user protocol; [`blk`] and [`net`] speak virtio-blk and virtio-net on top.

pub mod blk;
mod connection;
mod memory;
pub mod net;
mod virtqueue;

use std::io;

pub use connection::{Connection, Negotiation};
pub use memory::GuestRam;
pub use virtqueue::{Buffer, SplitQueue};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create guest memory")]
    Memory(#[source] io::Error),
    #[error("guest memory is full ({0} bytes requested)")]
    OutOfMemory(u64),
    #[error("guest memory access failed: {0}")]
    Access(String),
    #[error("vhost-user request failed")]
    Vhost(#[source] vhost::Error),
    #[error("the backend has {available} queues, {wanted} wanted")]
    TooFewQueues { available: u64, wanted: usize },
    #[error("the queue has no free descriptors")]
    QueueFull,
    #[error("no completion within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the backend returned an invalid used element (id {id})")]
    BadUsed { id: u32 },
    #[error("eventfd or poll failed")]
    Io(#[source] io::Error),
}

impl From<vhost::Error> for Error {
    fn from(error: vhost::Error) -> Self {
        Error::Vhost(error)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
