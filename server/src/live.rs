//! Which devices have a live `Connect` stream, and a way to reach each one.
//! A new stream for a device replaces the old one: dropping the old
//! sender makes the old stream end.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

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
    Command(Box<crate::model::Action>),
    /// The site's passcode policy changed: send it.
    PolicyChanged,
}

#[derive(Debug, Default)]
pub struct LiveStreams {
    next: AtomicU64,
    streams: Mutex<HashMap<String, (u64, mpsc::Sender<StreamSignal>)>>,
}

/// A registered stream: its generation and where its signals arrive.
#[derive(Debug)]
pub struct Registration {
    pub generation: u64,
    pub signals: mpsc::Receiver<StreamSignal>,
}

impl LiveStreams {
    pub fn register(&self, device_id: &str) -> Registration {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(8);
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if streams
            .insert(device_id.to_owned(), (generation, tx))
            .is_some()
        {
            tracing::info!(device_id, "a new stream replaces the open one");
        }
        Registration {
            generation,
            signals: rx,
        }
    }

    /// Removes the stream if it is still the registered one.
    pub fn unregister(&self, device_id: &str, generation: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if streams
            .get(device_id)
            .is_some_and(|(g, _)| *g == generation)
        {
            streams.remove(device_id);
        }
    }

    pub fn is_online(&self, device_id: &str) -> bool {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(device_id)
    }

    fn sender(&self, device_id: &str) -> Option<mpsc::Sender<StreamSignal>> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device_id)
            .map(|(_, tx)| tx.clone())
    }

    /// Sends a signal to the device's stream; false when it has none.
    pub fn signal(&self, device_id: &str, signal: StreamSignal) -> bool {
        self.sender(device_id)
            .is_some_and(|tx| tx.try_send(signal).is_ok())
    }

    /// Sends a signal to the device's stream even when its signal queue is
    /// full (then from a task, once there is room); false when it has no
    /// stream. A command handed over this way must not be dropped: it would
    /// only go out on the device's next stream.
    pub fn deliver(&self, device_id: &str, signal: StreamSignal) -> bool {
        let Some(tx) = self.sender(device_id) else {
            return false;
        };
        match tx.try_send(signal) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(signal)) => {
                // Ends when the stream takes it or closes.
                tokio::spawn(async move { tx.send(signal).await });
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn count(&self) -> usize {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_for_a_full_stream_is_delivered_once_there_is_room() {
        let live = LiveStreams::default();
        let mut stream = live.register("dv_1");
        let policy = || StreamSignal::PolicyChanged;
        while live.signal("dv_1", policy()) {}
        assert!(
            live.deliver("dv_1", StreamSignal::Replaced),
            "taken although full"
        );
        let mut received = Vec::new();
        while received.last() != Some(&StreamSignal::Replaced) {
            let signal =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.signals.recv())
                    .await
                    .expect("the held signal arrives")
                    .expect("stream open");
            received.push(signal);
        }
        assert!(
            received[..received.len() - 1]
                .iter()
                .all(|s| *s == policy())
        );
        assert!(!live.deliver("dv_2", policy()), "no stream, nothing taken");
    }
}
