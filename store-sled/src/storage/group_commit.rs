//! Group commit: concurrent callers share sled flushes.

use super::*;

/// Under concurrent load, rounds of the group commit start at least this
/// far apart, so that each flush covers many callers: every flush costs a
/// log write and a `sync_file_range` on sled's threads, and at thousands of
/// commits a second those dominated the server's CPU (BENCHMARKS.md). A
/// caller working alone is never held back.
pub(super) const MIN_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// Group commit: callers take tickets, one flusher serves them in rounds.
#[derive(Debug)]
pub(super) struct GroupCommit {
    pub(super) state: Mutex<CommitState>,
    /// (highest ticket flushed, highest ticket whose flush failed)
    /// Flushed up to this ticket; the last failed round's ticket, and
    /// whether it failed for a full disk.
    pub(super) done: tokio::sync::watch::Sender<(u64, Option<(u64, bool)>)>,
}

#[derive(Debug, Default)]
pub(super) struct CommitState {
    pub(super) requested: u64,
    pub(super) flushing: bool,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            done: tokio::sync::watch::channel((0, None)).0,
        }
    }
}

impl GroupCommit {
    pub(super) fn flush_loop(&self, db: &sled::Db) {
        // When the last round served several callers, more are coming.
        let mut busy_since: Option<std::time::Instant> = None;
        loop {
            if let Some(at) = busy_since {
                let ready = at + MIN_FLUSH_INTERVAL;
                let now = std::time::Instant::now();
                if ready > now {
                    std::thread::sleep(ready - now);
                }
            }
            let (target, flushed) = {
                let mut state = hold_commit(&self.state);
                let flushed = self.done.borrow().0;
                if state.requested == flushed {
                    state.flushing = false;
                    return;
                }
                (state.requested, flushed)
            };
            busy_since = (target - flushed > 1).then(std::time::Instant::now);
            let result = db.flush();
            if let Err(error) = &result {
                tracing::error!(%error, "flushing the database failed");
            }
            self.done.send_modify(|(flushed, failed)| {
                *flushed = target;
                if let Err(error) = result {
                    *failed = Some((target, StorageError::from(error).is_disk_full()));
                }
            });
        }
    }
}

pub(super) fn hold_commit(lock: &Mutex<CommitState>) -> MutexGuard<'_, CommitState> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Storage {
    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write this caller made so far durable, without blocking
    /// the runtime. Concurrent callers share flushes (group commit): one
    /// flusher runs at a time, and each flush covers every caller that
    /// arrived before it started. (sled's own `flush_async` is known to
    /// deadlock; a blocking flush on the blocking pool is not.)
    pub async fn flush_async(&self) -> Result<(), StorageError> {
        let ticket = {
            let mut state = hold_commit(&self.commit.state);
            state.requested += 1;
            let ticket = state.requested;
            if !state.flushing {
                state.flushing = true;
                let db = self.db.clone();
                let commit = self.commit.clone();
                tokio::task::spawn_blocking(move || commit.flush_loop(&db));
            }
            ticket
        };
        let mut done = self.commit.done.subscribe();
        loop {
            let (flushed, failed) = *done.borrow_and_update();
            if flushed >= ticket {
                return match failed {
                    Some((at, true)) if at >= ticket => Err(StorageError::Files(
                        std::io::Error::from(std::io::ErrorKind::StorageFull),
                    )),
                    Some((at, false)) if at >= ticket => Err(StorageError::Corrupt(
                        "flushing the database failed; see the log".into(),
                    )),
                    _ => Ok(()),
                };
            }
            if done.changed().await.is_err() {
                return Err(StorageError::Corrupt("the flusher stopped".into()));
            }
        }
    }
}
