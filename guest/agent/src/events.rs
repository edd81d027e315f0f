//! The container event queue behind `GetEvents`: events wait here until a subscriber takes them, so none is
//! lost while the host reconnects. One subscriber at a time: a new one ends the previous one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use podvisor_proto as pb;
use tokio::sync::Notify;

/// Events kept while nobody subscribes; the oldest are dropped beyond this.
const QUEUE_LIMIT: usize = 4096;

/// The queue.
#[derive(Default)]
pub struct Events {
    queue: Mutex<VecDeque<pb::Event>>,
    notify: Notify,
    generation: AtomicU64,
}

impl Events {
    /// Queues an event.
    pub fn push(&self, event: pb::Event) {
        {
            let mut q = self.queue.lock().expect("event queue lock");
            if q.len() >= QUEUE_LIMIT {
                q.pop_front();
            }
            q.push_back(event);
        }
        self.notify.notify_waiters();
    }

    /// Starts a subscription; earlier subscriptions end at their next event.
    pub fn subscribe(&self) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.notify.notify_waiters();
        generation
    }

    /// The next event for subscription `generation`; `None` once a newer subscription exists.
    pub async fn next(&self, generation: u64) -> Option<pb::Event> {
        loop {
            let notified = self.notify.notified();
            if self.generation.load(Ordering::SeqCst) != generation {
                return None;
            }
            if let Some(e) = self.queue.lock().expect("event queue lock").pop_front() {
                return Some(e);
            }
            notified.await;
        }
    }

    /// Puts back an event a subscriber could not deliver.
    pub fn unget(&self, event: pb::Event) {
        self.queue
            .lock()
            .expect("event queue lock")
            .push_front(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(pid: u32) -> pb::Event {
        pb::Event {
            kind: pb::EventKind::Exit.into(),
            pid,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn queued_until_taken_and_newer_subscriber_wins() {
        let events = Events::default();
        events.push(exit(1));
        let first = events.subscribe();
        assert_eq!(events.next(first).await.unwrap().pid, 1);
        let waiter = {
            let events = &events;
            async move { events.next(first).await }
        };
        let (got, ()) = tokio::join!(waiter, async {
            tokio::task::yield_now().await;
            events.push(exit(2));
        });
        assert_eq!(got.unwrap().pid, 2);
        events.unget(exit(3));
        let second = events.subscribe();
        assert!(events.next(first).await.is_none());
        assert_eq!(events.next(second).await.unwrap().pid, 3);
    }
}
