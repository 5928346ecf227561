//! Which devices have a live `Connect` stream, and a way to reach each one.
//!
//! Each stream has a mailbox, not a bounded channel: what ends a stream
//! (unenroll, replacement, a newer stream) and the hints "policy changed" and
//! "look at the queue" are flags that a full queue can never drop, and a
//! session blocked on an agent that stopped reading still sees them. Only
//! commands handed over with their SENT record are queued, up to a bound;
//! past it the session re-reads the stored queue instead, which holds them
//! too, so nothing piles up in memory or in tasks for a stuck stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::model::Action;

/// Commands handed over to one stream and not yet taken; more fall back to
/// a re-read of the stored queue.
const HANDED_OVER_LIMIT: usize = 64;

/// Something the server tells a live stream out of band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSignal {
    /// The device was unenrolled: tell the agent, then close.
    Unenrolled { action_id: String },
    /// The device enrolled again under a new id: close.
    Replaced,
    /// A command was queued for the device: send what is queued.
    NewCommand { action_id: String },
    /// This command was queued, already recorded as SENT and committed:
    /// send it without reading the queue.
    Command(Box<Action>),
    /// The site's passcode policy changed: send it.
    PolicyChanged,
}

/// Why a stream must end; once set it never changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    Unenrolled {
        action_id: String,
    },
    Replaced,
    /// A newer stream of the same device took over.
    Superseded,
}

/// What a session is told next, most urgent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    End(StreamEnd),
    PolicyChanged,
    Command(Box<Action>),
    /// Read the stored queue: something was queued that is not handed over.
    Rescan,
}

#[derive(Debug, Default)]
struct Inbox {
    end: Option<StreamEnd>,
    policy_changed: bool,
    rescan: bool,
    commands: VecDeque<Box<Action>>,
}

#[derive(Debug, Default)]
struct Mailbox {
    inbox: Mutex<Inbox>,
    // One waiter each (the session); a permit is kept while it is not waiting.
    changed: Notify,
    ending: Notify,
}

impl Mailbox {
    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, signal: StreamSignal) {
        {
            let mut inbox = self.inbox();
            match signal {
                StreamSignal::Unenrolled { action_id } => {
                    drop(inbox);
                    return self.end(StreamEnd::Unenrolled { action_id });
                }
                StreamSignal::Replaced => {
                    drop(inbox);
                    return self.end(StreamEnd::Replaced);
                }
                StreamSignal::NewCommand { .. } => inbox.rescan = true,
                StreamSignal::PolicyChanged => inbox.policy_changed = true,
                StreamSignal::Command(action) => {
                    if inbox.commands.len() < HANDED_OVER_LIMIT {
                        inbox.commands.push_back(action);
                    } else {
                        inbox.rescan = true;
                    }
                }
            }
        }
        self.changed.notify_one();
    }

    fn end(&self, why: StreamEnd) {
        self.inbox().end.get_or_insert(why);
        self.changed.notify_one();
        self.ending.notify_one();
    }
}

type Streams = Arc<Mutex<HashMap<String, (u64, Arc<Mailbox>)>>>;

#[derive(Debug, Default)]
pub struct LiveStreams {
    next: AtomicU64,
    streams: Streams,
}

/// A registered stream: its generation and where its signals arrive. The
/// device stays online while this lives (also if its session panics: the
/// drop takes it offline).
#[derive(Debug)]
pub struct Registration {
    pub generation: u64,
    device_id: String,
    mailbox: Arc<Mailbox>,
    streams: Streams,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if streams
            .get(&self.device_id)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            streams.remove(&self.device_id);
        }
    }
}

impl Registration {
    /// The next signal; waits until there is one. An end is returned again
    /// on every call once set.
    pub async fn next(&self) -> Signal {
        loop {
            if let Some(signal) = self.take() {
                return signal;
            }
            self.mailbox.changed.notified().await;
        }
    }

    fn take(&self) -> Option<Signal> {
        let mut inbox = self.mailbox.inbox();
        if let Some(end) = &inbox.end {
            return Some(Signal::End(end.clone()));
        }
        if std::mem::take(&mut inbox.policy_changed) {
            return Some(Signal::PolicyChanged);
        }
        if let Some(action) = inbox.commands.pop_front() {
            return Some(Signal::Command(action));
        }
        std::mem::take(&mut inbox.rescan).then_some(Signal::Rescan)
    }

    /// Resolves once the stream must end, leaving other signals in place.
    pub async fn ended(&self) -> StreamEnd {
        loop {
            if let Some(end) = self.mailbox.inbox().end.clone() {
                return end;
            }
            self.mailbox.ending.notified().await;
        }
    }
}

impl LiveStreams {
    pub fn register(&self, device_id: &str) -> Registration {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, old)) = streams.insert(device_id.to_owned(), (generation, mailbox.clone()))
        {
            tracing::info!(device_id, "a new stream replaces the open one");
            old.end(StreamEnd::Superseded);
        }
        Registration {
            generation,
            device_id: device_id.to_owned(),
            mailbox,
            streams: self.streams.clone(),
        }
    }

    pub fn is_online(&self, device_id: &str) -> bool {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(device_id)
    }

    /// Tells the device's stream; false when it has none. Never blocks and
    /// never drops a signal. A signal that ends the stream also takes the
    /// device offline at once, before its session has noticed.
    pub fn signal(&self, device_id: &str, signal: StreamSignal) -> bool {
        let ends = matches!(
            signal,
            StreamSignal::Unenrolled { .. } | StreamSignal::Replaced
        );
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let mailbox = if ends {
            streams.remove(device_id).map(|(_, mailbox)| mailbox)
        } else {
            streams.get(device_id).map(|(_, mailbox)| mailbox.clone())
        };
        drop(streams);
        match mailbox {
            Some(mailbox) => {
                mailbox.post(signal);
                true
            }
            None => false,
        }
    }

    pub fn count(&self) -> usize {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn action(id: &str) -> Box<Action> {
        Box::new(Action {
            action_id: id.into(),
            site_id: "st_1".into(),
            device_id: "dv_1".into(),
            action_type: crate::model::ActionType::Lock,
            status: crate::model::ActionStatus::Sent,
            created_by: "admin@example.com".into(),
            created_at: 0,
            updated_at: 0,
            timeline: Vec::new(),
            failure_reason: String::new(),
            failure_code: None,
            expires_at: 0,
            payload: None,
        })
    }

    async fn next(registration: &Registration) -> Signal {
        tokio::time::timeout(Duration::from_secs(5), registration.next())
            .await
            .expect("a signal arrives")
    }

    #[tokio::test]
    async fn an_end_is_never_lost_behind_a_full_queue_and_wins_over_everything() {
        let live = LiveStreams::default();
        let stream = live.register("dv_1");
        for i in 0..10 * HANDED_OVER_LIMIT {
            assert!(live.signal("dv_1", StreamSignal::Command(action(&format!("a{i}")))));
            assert!(live.signal("dv_1", StreamSignal::PolicyChanged));
        }
        assert!(live.signal(
            "dv_1",
            StreamSignal::Unenrolled {
                action_id: "u".into()
            }
        ));
        assert!(!live.is_online("dv_1"), "offline as soon as it is told");
        let end = StreamEnd::Unenrolled {
            action_id: "u".into(),
        };
        assert_eq!(next(&stream).await, Signal::End(end.clone()));
        assert_eq!(next(&stream).await, Signal::End(end.clone()), "sticky");
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), stream.ended())
                .await
                .expect("ended"),
            end
        );
        assert!(!live.signal("dv_1", StreamSignal::PolicyChanged));
    }

    #[tokio::test]
    async fn handed_over_commands_past_the_bound_become_one_rescan() {
        let live = LiveStreams::default();
        let stream = live.register("dv_1");
        for i in 0..HANDED_OVER_LIMIT + 5 {
            live.signal("dv_1", StreamSignal::Command(action(&format!("a{i}"))));
        }
        live.signal("dv_1", StreamSignal::PolicyChanged);
        live.signal("dv_1", StreamSignal::PolicyChanged);
        assert_eq!(next(&stream).await, Signal::PolicyChanged, "coalesced");
        for i in 0..HANDED_OVER_LIMIT {
            assert_eq!(
                next(&stream).await,
                Signal::Command(action(&format!("a{i}")))
            );
        }
        assert_eq!(next(&stream).await, Signal::Rescan);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), stream.next())
                .await
                .is_err(),
            "nothing more"
        );
    }

    #[tokio::test]
    async fn a_newer_stream_ends_the_older_one_and_keeps_the_device_online() {
        let live = LiveStreams::default();
        let old = live.register("dv_1");
        let new = live.register("dv_1");
        assert_eq!(next(&old).await, Signal::End(StreamEnd::Superseded));
        drop(old);
        assert!(
            live.is_online("dv_1"),
            "the older stream's end leaves the newer"
        );
        live.signal("dv_1", StreamSignal::Replaced);
        assert_eq!(next(&new).await, Signal::End(StreamEnd::Replaced));
        let again = live.register("dv_1");
        drop(again);
        assert!(!live.is_online("dv_1"), "a dropped registration is offline");
    }

    #[tokio::test]
    async fn waiting_for_the_end_does_not_swallow_other_signals() {
        let live = LiveStreams::default();
        let stream = live.register("dv_1");
        let waiting = tokio::time::timeout(Duration::from_millis(100), stream.ended());
        live.signal("dv_1", StreamSignal::PolicyChanged);
        assert!(waiting.await.is_err(), "a policy change is no end");
        assert_eq!(next(&stream).await, Signal::PolicyChanged);
    }
}
