//! Group commit: concurrent calls of one operation share a transaction.
//!
//! A commit waits for its WAL flush, and operations on one device hold the
//! device's row until they commit; one transaction per call would cost a
//! flush and several round trips per command. A [`Combiner`] hands the
//! calls that arrive while earlier batches are still running to one
//! transaction. A call that arrives alone runs at once: batching adds no
//! wait when the server is idle.

use std::future::Future;
use std::sync::Arc;

use mdm_core::store::StoreError;
use tokio::sync::{Semaphore, mpsc};

/// Jobs waiting for a batch. Beyond it, callers wait for room: the queue
/// cannot grow without bound.
const QUEUE: usize = 4096;

pub(crate) struct Combiner<J> {
    jobs: mpsc::Sender<J>,
}

impl<J: Send + 'static> Combiner<J> {
    /// Runs `run` on batches of at most `max_batch` jobs, at most
    /// `in_flight` batches at a time. The task stops when the combiner is
    /// dropped and every job it took has run.
    pub(crate) fn start<F, Fut>(max_batch: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (jobs, mut queue) = mpsc::channel::<J>(QUEUE);
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                // The jobs that came while every slot was busy join this batch.
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let work = run(batch);
                tokio::spawn(async move {
                    work.await;
                    drop(slot);
                });
            }
        });
        Combiner { jobs }
    }

    /// Hands `job` to a batch; gives it back when no batch can take it (the
    /// runtime that ran the combiner is gone), for the caller to run alone.
    pub(crate) async fn submit(&self, job: J) -> Result<(), J> {
        self.jobs.send(job).await.map_err(|error| error.0)
    }
}

/// The same failure for every call of a batch (`StoreError` holds boxed
/// sources, which do not clone).
pub(crate) fn copy_of(error: &StoreError) -> StoreError {
    match error {
        StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
        StoreError::DiskFull => StoreError::DiskFull,
        StoreError::Corrupt(why) => StoreError::Corrupt(why.clone()),
        StoreError::BadPageToken => StoreError::BadPageToken,
        other => StoreError::Backend(other.to_string().into()),
    }
}
