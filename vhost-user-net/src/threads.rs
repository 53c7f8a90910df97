//! Which worker thread serves which queue pair, and what an epoll event a thread receives is
//! about.
//!
//! Queue pair p (receive queue 2p, transmit queue 2p+1) is on thread p mod N; the control
//! queue (2 × pairs) is on thread 0. vhost-user-backend gives each thread the vrings in its
//! mask in queue order and names a kick by its position among them; ids from the queue count
//! up are its own (exit, vring enable) and ours: each pair's tap queue, by the pair's position
//! on its thread.

/// The pair-to-thread assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadMap {
    pairs: usize,
    /// Per thread, its pairs in ascending order.
    groups: Vec<Vec<usize>>,
}

/// What an event is about, with the position of the vring(s) concerned on the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest added receive buffers.
    RxKick {
        pair: usize,
        rx: usize,
    },
    /// The guest added frames to send.
    TxKick {
        pair: usize,
        tx: usize,
    },
    /// The tap has frames for the guest.
    Tap {
        pair: usize,
        rx: usize,
    },
    Control {
        vring: usize,
    },
}

impl ThreadMap {
    /// `threads` (clamped to 1..=pairs) threads for `pairs` queue pairs.
    pub fn new(pairs: u16, threads: u16) -> Self {
        let pairs = usize::from(pairs.max(1));
        let threads = usize::from(threads).clamp(1, pairs);
        let mut groups = vec![Vec::new(); threads];
        for pair in 0..pairs {
            groups[pair % threads].push(pair);
        }
        Self { pairs, groups }
    }

    /// Every virtqueue: the pairs' and the control queue.
    pub fn queues(&self) -> usize {
        2 * self.pairs + 1
    }

    pub fn control_queue(&self) -> usize {
        2 * self.pairs
    }

    pub fn pairs_of(&self, thread: usize) -> &[usize] {
        self.groups.get(thread).map_or(&[], Vec::as_slice)
    }

    /// The masks vhost-user-backend takes from `queues_per_thread`.
    pub fn masks(&self) -> Vec<u64> {
        self.groups
            .iter()
            .enumerate()
            .map(|(thread, group)| {
                let pairs = group.iter().fold(0u64, |m, &p| m | 0b11 << (2 * p));
                if thread == 0 {
                    pairs | 1 << self.control_queue()
                } else {
                    pairs
                }
            })
            .collect()
    }

    /// The event id of the tap queue of the pair at `position` on its thread.
    pub fn tap_event(&self, position: usize) -> u16 {
        (self.queues() + 1 + position) as u16
    }

    pub fn event(&self, thread: usize, device_event: u16) -> Option<Event> {
        let group = self.groups.get(thread)?;
        let id = usize::from(device_event);
        let own = self.queues() + 1;
        if id < 2 * group.len() {
            let pair = group[id / 2];
            let rx = id & !1;
            return Some(if id % 2 == 0 {
                Event::RxKick { pair, rx }
            } else {
                Event::TxKick { pair, tx: id }
            });
        }
        if thread == 0 && id == 2 * group.len() {
            return Some(Event::Control { vring: id });
        }
        if id >= own && id - own < group.len() {
            let position = id - own;
            return Some(Event::Tap {
                pair: group[position],
                rx: 2 * position,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair() {
        let map = ThreadMap::new(1, 1);
        assert_eq!(map.queues(), 3);
        assert_eq!(map.masks(), vec![0b111]);
        assert_eq!(map.event(0, 0), Some(Event::RxKick { pair: 0, rx: 0 }));
        assert_eq!(map.event(0, 1), Some(Event::TxKick { pair: 0, tx: 1 }));
        assert_eq!(map.event(0, 2), Some(Event::Control { vring: 2 }));
        assert_eq!(map.event(0, 3), None, "vhost-user-backend's exit event");
        assert_eq!(map.tap_event(0), 4);
        assert_eq!(map.event(0, 4), Some(Event::Tap { pair: 0, rx: 0 }));
        assert_eq!(map.event(0, 5), None);
    }

    #[test]
    fn pairs_dealt_round_robin() {
        let map = ThreadMap::new(3, 2);
        assert_eq!(map.pairs_of(0), &[0, 2]);
        assert_eq!(map.pairs_of(1), &[1]);
        assert_eq!(map.masks(), vec![0b1_11_00_11, 0b00_11_00]);
        assert_eq!(map.event(0, 2), Some(Event::RxKick { pair: 2, rx: 2 }));
        assert_eq!(map.event(0, 3), Some(Event::TxKick { pair: 2, tx: 3 }));
        assert_eq!(map.event(0, 4), Some(Event::Control { vring: 4 }));
        assert_eq!(map.event(1, 1), Some(Event::TxKick { pair: 1, tx: 1 }));
        assert_eq!(map.event(1, 2), None);
        assert_eq!(map.event(1, 8), Some(Event::Tap { pair: 1, rx: 0 }));
        assert_eq!(map.event(0, 9), Some(Event::Tap { pair: 2, rx: 2 }));
        assert_eq!(map.event(1, 9), None);
        assert_eq!(ThreadMap::new(2, 9).masks().len(), 2);
    }
}
