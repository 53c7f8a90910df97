//! Which worker thread serves which queue, and the epoll event ids of a thread's queues.
//!
//! Queues are dealt to threads round-robin (queue q on thread q mod N). vhost-user-backend gives
//! each thread the vrings in its mask, in queue order, and names a queue's kick by its position
//! among them; ids from the queue count up are its own (exit, vring enable) and ours. Each
//! queue on a thread gets two of ours after those: its I/O completions and its resume event.

/// The queue-to-thread assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadMap {
    queues: u16,
    /// Per thread, its queues in ascending order (the order of the vrings it is handed).
    groups: Vec<Vec<usize>>,
}

/// What an event a thread received is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEvent {
    /// The queue's index on the device.
    pub queue: usize,
    /// Its position among the thread's vrings.
    pub position: usize,
}

impl ThreadMap {
    /// `threads` worker threads for `queues` queues; `threads` is clamped to 1..=queues.
    pub fn new(queues: u16, threads: u16) -> Self {
        let threads = usize::from(threads.clamp(1, queues.max(1)));
        let mut groups = vec![Vec::new(); threads];
        for queue in 0..usize::from(queues) {
            groups[queue % threads].push(queue);
        }
        Self { queues, groups }
    }

    /// The queues of `thread`, in the order of the vrings it is handed.
    pub fn queues_of(&self, thread: usize) -> &[usize] {
        self.groups.get(thread).map_or(&[], Vec::as_slice)
    }

    /// The masks vhost-user-backend takes from `queues_per_thread`.
    pub fn masks(&self) -> Vec<u64> {
        self.groups
            .iter()
            .map(|group| group.iter().fold(0u64, |mask, &q| mask | 1 << q))
            .collect()
    }

    /// Event id of the I/O completions of the queue at `position` on its thread.
    pub fn completion_event(&self, position: usize) -> u64 {
        u64::from(self.queues) + 1 + 2 * position as u64
    }

    /// Event id of the resume event of the queue at `position` on its thread.
    pub fn resume_event(&self, position: usize) -> u64 {
        self.completion_event(position) + 1
    }

    /// The queue an event of `thread` belongs to: a kick (ids below the thread's vring count),
    /// or one of ours. None for anything else.
    pub fn event(&self, thread: usize, device_event: u16) -> Option<QueueEvent> {
        let group = self.groups.get(thread)?;
        let id = usize::from(device_event);
        let first_own = usize::from(self.queues) + 1;
        let position = if id < group.len() {
            id
        } else if id >= first_own {
            (id - first_own) / 2
        } else {
            return None;
        };
        group
            .get(position)
            .map(|&queue| QueueEvent { queue, position })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_per_queue() {
        let map = ThreadMap::new(3, 3);
        assert_eq!(map.masks(), vec![0b001, 0b010, 0b100]);
        assert_eq!(map.queues_of(2), &[2]);
        assert_eq!(
            map.event(2, 0),
            Some(QueueEvent {
                queue: 2,
                position: 0
            })
        );
        // Ids 1..=3 are not this thread's kicks, nor ours (3 is vhost-user-backend's).
        for id in 1..=3 {
            assert_eq!(map.event(2, id), None);
        }
        assert_eq!(map.completion_event(0), 4);
        assert_eq!(map.resume_event(0), 5);
        assert_eq!(map.event(1, 4).map(|e| e.queue), Some(1));
        assert_eq!(map.event(1, 5).map(|e| e.queue), Some(1));
        assert_eq!(map.event(1, 6), None);
    }

    #[test]
    fn queues_are_dealt_round_robin() {
        let map = ThreadMap::new(5, 2);
        assert_eq!(map.masks().len(), 2);
        assert_eq!(map.queues_of(0), &[0, 2, 4]);
        assert_eq!(map.queues_of(1), &[1, 3]);
        assert_eq!(map.masks(), vec![0b10101, 0b01010]);
        // Thread 1's kicks are ids 0 and 1 (queues 1 and 3); ours start after id 5.
        assert_eq!(map.event(1, 1).map(|e| e.queue), Some(3));
        assert_eq!(map.event(1, 2), None);
        assert_eq!(map.completion_event(1), 8);
        assert_eq!(
            map.event(1, 8),
            Some(QueueEvent {
                queue: 3,
                position: 1
            })
        );
        assert_eq!(map.event(1, 9).map(|e| e.queue), Some(3));
        assert_eq!(map.event(1, 10), None);
        assert_eq!(map.event(0, 10).map(|e| e.queue), Some(4));
        assert_eq!(map.event(2, 0), None);
    }

    #[test]
    fn thread_count_is_clamped() {
        assert_eq!(ThreadMap::new(2, 8).masks(), vec![0b01, 0b10]);
        assert_eq!(ThreadMap::new(4, 0).masks(), vec![0b1111]);
        assert_eq!(ThreadMap::new(64, 1).masks(), vec![u64::MAX]);
    }
}
