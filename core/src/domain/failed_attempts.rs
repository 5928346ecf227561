//! Counting wrong company passcodes off the response path: one task,
//! started with the first refusal, counts failures in order (one store call
//! per batch) and raises the lockout alert. A refusal that waited for the
//! count would tell a caller by its time whether the email is known.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use super::alerts::SiteAdmins;
use crate::error::Result;
use crate::model::{
    Alert, AlertKind, CompanyPasscodeRecord, Millis, Notification, Site, now_millis,
    time_ordered_id,
};
use crate::store::{FailedAttempt, FailedAttemptEntry, Store};

/// Failures waiting to be counted; a full queue makes refusals wait for room
/// (every refusal alike), it never drops a failure.
const FAILURE_QUEUE_CAPACITY: usize = 1024;
/// Failures counted per flush at most.
const FAILURE_BATCH: usize = 256;
/// How long the counter waits after being woken by a failure before it
/// counts. Woken at once, its writes and flush competed for the CPU with the
/// very refusal that woke it: on two cores that made a known email's refusal
/// about 170 µs slower in some runs (`tests/tests/security_oracles.rs`).
const COUNT_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// What counting failures needs, shared with the task that counts them.
#[derive(Debug, Clone)]
struct FailureCounter {
    store: Arc<dyn Store>,
    admins: Arc<dyn SiteAdmins>,
    alerts: broadcast::Sender<Alert>,
    outbox_wake: Arc<Notify>,
}

impl FailureCounter {
    /// The sites a wrong passcode given with `email` counts against.
    async fn entries(&self, email: &str, source: IpAddr) -> Result<Vec<FailedAttemptEntry>> {
        let mut entries = Vec::new();
        for site_id in self.store.sites_of_email(email).await? {
            let Some(site) = self.store.get_site(&site_id).await? else {
                continue;
            };
            if self.store.get_user(&site_id, email).await?.is_none() {
                continue; // a dangling index entry
            }
            entries.push(FailedAttemptEntry {
                site,
                source: source.to_string(),
                at: now_millis(),
            });
        }
        Ok(entries)
    }

    /// Counts the failures as one unit of the store, in order.
    async fn count(&self, entries: &[FailedAttemptEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let lockout = |site: &Site, record: &CompanyPasscodeRecord| {
            self.lockout_alert(site, record, now_millis())
        };
        let outcomes = self.store.record_failed_attempts(entries, &lockout).await?;
        for (entry, outcome) in entries.iter().zip(outcomes) {
            let site_id = &entry.site.site_id;
            match outcome {
                FailedAttempt::LockedOut(alert) => {
                    tracing::warn!(
                        site_id = %site_id,
                        failed_attempts = alert.failed_attempts,
                        sources = ?alert.source_addresses,
                        "company passcode locked out after too many failed attempts"
                    );
                    let _ = self.alerts.send(*alert);
                    self.outbox_wake.notify_one();
                }
                FailedAttempt::Counted { failed_attempts } => {
                    tracing::info!(site_id = %site_id, failed_attempts, source = %entry.source, "wrong company passcode");
                }
                FailedAttempt::NotEnabled => {}
            }
        }
        Ok(())
    }

    fn lockout_alert(
        &self,
        site: &Site,
        record: &CompanyPasscodeRecord,
        now: Millis,
    ) -> (Alert, Vec<Notification>) {
        let details = format!(
            "The company passcode of site {} ({}) was entered incorrectly {} times (limit {}) and has been disabled. Self-service enrollment stays off until an administrator generates a new passcode. Source addresses: {}.",
            site.display_name,
            site.site_id,
            record.failed_attempts,
            site.failed_attempt_limit,
            record.failed_sources.join(", ")
        );
        let alert = Alert {
            alert_id: time_ordered_id(),
            site_id: site.site_id.clone(),
            kind: AlertKind::CompanyPasscodeLockedOut,
            created_at: now,
            details,
            failed_attempts: record.failed_attempts,
            source_addresses: record.failed_sources.clone(),
        };
        let notifications = super::alerts::notifications(
            self.admins.as_ref(),
            site,
            &alert,
            &format!(
                "Security alert: company passcode failed-attempt limit exceeded ({})",
                site.display_name
            ),
        );
        (alert, notifications)
    }
}

enum FailureJob {
    /// A refusal; `email` is set when it counts as a failed attempt.
    Refused {
        email: Option<String>,
        source: IpAddr,
    },
    /// Answered once every job queued before it is counted and flushed.
    Settled(oneshot::Sender<()>),
}

enum Queue {
    NotStarted,
    Running(mpsc::Sender<FailureJob>, tokio::task::JoinHandle<()>),
    /// After [`FailedAttempts::close`]: failures are counted in place.
    Closed,
}

/// The failed-attempt bookkeeping: one task, started
/// with the first refusal, counts failures in order and flushes once per
/// batch. Admin reads of what it writes, and every enrollment that is about
/// to succeed, first wait for it to settle.
pub(crate) struct FailedAttempts {
    counter: FailureCounter,
    queue: Mutex<Queue>,
    /// Refusals handed to the counter, and those it has counted: equal
    /// when no count is in flight.
    refusals_queued: AtomicU64,
    refusals_counted: Arc<AtomicU64>,
}

impl std::fmt::Debug for FailedAttempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailedAttempts").finish_non_exhaustive()
    }
}

impl FailedAttempts {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        admins: Arc<dyn SiteAdmins>,
        alerts: broadcast::Sender<Alert>,
        outbox_wake: Arc<Notify>,
    ) -> Self {
        Self {
            counter: FailureCounter {
                store,
                admins,
                alerts,
                outbox_wake,
            },
            queue: Mutex::new(Queue::NotStarted),
            refusals_queued: AtomicU64::new(0),
            refusals_counted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A mark when no refusal is being counted right now; see [`Self::quiet_since`].
    pub(crate) fn quiet_mark(&self) -> Option<u64> {
        let queued = self.refusals_queued.load(Ordering::SeqCst);
        (self.refusals_counted.load(Ordering::SeqCst) == queued).then_some(queued)
    }

    /// Whether no refusal was queued since `mark` was taken: then no count
    /// can have changed a passcode's state in between.
    pub(crate) fn quiet_since(&self, mark: Option<u64>) -> bool {
        mark.is_some_and(|queued| self.refusals_queued.load(Ordering::SeqCst) == queued)
    }

    /// The queue's sender; None once closed.
    fn sender(&self, start: bool) -> Option<mpsc::Sender<FailureJob>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if start && matches!(*queue, Queue::NotStarted) {
            let (tx, rx) = mpsc::channel(FAILURE_QUEUE_CAPACITY);
            let counter = self.counter.clone();
            let task = tokio::spawn(Self::run(counter, rx, self.refusals_counted.clone()));
            *queue = Queue::Running(tx, task);
        }
        match &*queue {
            Queue::Running(tx, _) => Some(tx.clone()),
            Queue::NotStarted | Queue::Closed => None,
        }
    }

    /// The counting loop, a task of its own that starts a batch only after
    /// [`COUNT_DELAY`], so its store work does not compete with the refusal
    /// that woke it. A batch of failures is one call to the store (one flush
    /// or transaction). It is a task, not a thread blocking on the runtime:
    /// a runtime that shuts down ends it instead of waiting for it forever.
    async fn run(
        counter: FailureCounter,
        mut jobs: mpsc::Receiver<FailureJob>,
        refusals_counted: Arc<AtomicU64>,
    ) {
        while let Some(first) = jobs.recv().await {
            if matches!(first, FailureJob::Refused { .. }) {
                tokio::time::sleep(COUNT_DELAY).await;
            }
            let mut waiting = Vec::new();
            let mut entries = Vec::new();
            let mut next = Some(first);
            let mut counted = 0;
            let mut refusals = 0;
            while let Some(job) = next.take() {
                if matches!(job, FailureJob::Refused { .. }) {
                    refusals += 1;
                }
                match job {
                    FailureJob::Refused {
                        email: Some(email),
                        source,
                    } => match counter.entries(&email, source).await {
                        Ok(found) => entries.extend(found),
                        Err(error) => tracing::error!(%error, "counting a failed attempt failed"),
                    },
                    FailureJob::Refused { email: None, .. } => {}
                    FailureJob::Settled(done) => waiting.push(done),
                }
                counted += 1;
                if counted < FAILURE_BATCH {
                    next = jobs.try_recv().ok();
                }
            }
            if let Err(error) = counter.count(&entries).await {
                tracing::error!(%error, "counting failed attempts failed");
            }
            refusals_counted.fetch_add(refusals, Ordering::SeqCst);
            for done in waiting {
                let _ = done.send(());
            }
        }
    }

    /// Queues a refusal (counted when `email` is set); returns at once
    /// unless the queue is full.
    pub(crate) async fn queue(&self, email: Option<String>, source: IpAddr) {
        match self.sender(true) {
            Some(tx) => {
                self.refusals_queued.fetch_add(1, Ordering::SeqCst);
                if tx
                    .send(FailureJob::Refused { email, source })
                    .await
                    .is_err()
                {
                    tracing::error!(
                        "the failed-attempt counter stopped; a failure was not counted"
                    );
                }
            }
            None => {
                let Some(email) = email else {
                    return;
                };
                let counted = match self.counter.entries(&email, source).await {
                    Ok(entries) => self.counter.count(&entries).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = counted {
                    tracing::error!(%error, "counting a failed attempt failed");
                }
            }
        }
    }

    /// Waits until every failure queued before the call is counted and flushed.
    pub(crate) async fn settled(&self) {
        let Some(tx) = self.sender(false) else {
            return;
        };
        let (done, counted) = oneshot::channel();
        if tx.send(FailureJob::Settled(done)).await.is_ok() {
            let _ = counted.await;
        }
    }

    /// Counts what is queued and stops the thread, so it lets go of storage.
    pub(crate) async fn close(&self) {
        let queue = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *queue, Queue::Closed)
        };
        if let Queue::Running(tx, task) = queue {
            drop(tx);
            if let Err(error) = task.await {
                tracing::error!(%error, "the failed-attempt counter panicked");
            }
        }
    }
}
