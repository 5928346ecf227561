//! The company passcode: generation, keyed hashing, regenerate / disable,
//! and `verify_company_passcode`, the one place enrollment asks whether a
//! passcode is good, counts failures and locks a site out.
//!
//! Failures are counted by one background thread ([`FailedAttempts`]), not
//! on the response path: counting writes and flushes only for an email that is
//! a user of some site, so a refusal that waited for it would tell a caller
//! by its time whether the email is known.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use rand::seq::IndexedRandom;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use zeroize::Zeroizing;

use crate::admins::AdminRegistry;
use crate::app::App;
use crate::error::{Error, Result};
use crate::model::{
    Alert, AlertKind, CompanyPasscodeInfo, CompanyPasscodeRecord, Millis, Notification,
    PasscodeState, Site, User, now_millis, time_ordered_id,
};
use mdm_core::store::{FailedAttempt, FailedAttemptEntry, Store};

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

pub const PASSCODE_LENGTH: usize = 12;
const DIGITS: &[u8] = b"0123456789";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A plaintext company passcode. Zeroized on drop; `Debug` hides it.
pub struct CompanyPasscode(Zeroizing<String>);

impl CompanyPasscode {
    /// 12 characters drawn uniformly from digits, lower- and upper-case
    /// letters by the OS CSPRNG, redrawn until every class is present (so
    /// the result is uniform over the valid passcodes).
    pub fn generate() -> Self {
        let alphabet: Vec<u8> = [DIGITS, LOWER, UPPER].concat();
        let mut rng = OsRng.unwrap_err();
        loop {
            let candidate: Zeroizing<String> = Zeroizing::new(
                (0..PASSCODE_LENGTH)
                    .map(|_| char::from(*alphabet.choose(&mut rng).expect("non-empty alphabet")))
                    .collect(),
            );
            let has = |class: &[u8]| candidate.bytes().any(|b| class.contains(&b));
            if has(DIGITS) && has(LOWER) && has(UPPER) {
                return Self(candidate);
            }
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for CompanyPasscode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompanyPasscode(<redacted>)")
    }
}

/// A passcode that verified: the site it belongs to and the enrolling user.
#[derive(Debug, Clone)]
pub struct VerifiedPasscode {
    pub site: Site,
    pub user: User,
}

/// Why a verification failed. Callers show the user one generic refusal;
/// this detail is for the log and the tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many failed attempts from {0}; try again later")]
    Throttled(IpAddr),
    #[error("the passcode matches no site")]
    WrongPasscode,
    #[error("the passcode of site {0} is disabled")]
    Disabled(String),
    #[error("the passcode of site {0} is locked out")]
    LockedOut(String),
    #[error("the email is not a user of site {0}")]
    NotAUser(String),
    #[error("the passcode is malformed")]
    Malformed,
}

impl App {
    fn passcode_hash(&self, passcode: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.passcode_key.as_slice())
            .expect("HMAC takes keys of any length");
        mac.update(passcode.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Generates a new passcode for the site, replacing the old one at once
    /// and resetting the failure count. The plaintext is returned once.
    pub async fn generate_company_passcode(
        &self,
        site_id: &str,
        admin_email: &str,
    ) -> Result<(CompanyPasscode, CompanyPasscodeInfo)> {
        let site = self.site(site_id).await?;
        // Failures of the old passcode must not be counted against the new one.
        self.failed_attempts.settled().await;
        let passcode = CompanyPasscode::generate();
        let previous = self.store.get_passcode(site_id).await?;
        let record = CompanyPasscodeRecord {
            site_id: site.site_id.clone(),
            state: PasscodeState::Enabled,
            hash: hex::encode(self.passcode_hash(passcode.expose())),
            generated_at: now_millis(),
            generated_by: admin_email.to_owned(),
            failed_attempts: 0,
            last_failed_at: None,
            last_used_at: None,
            enrollments: 0,
            failed_sources: Vec::new(),
            pending_lockout: None,
        };
        self.store.replace_passcode(&record).await?;
        tracing::info!(
            site_id,
            admin = admin_email,
            replaced = previous.is_some(),
            "company passcode generated"
        );
        Ok((passcode, CompanyPasscodeInfo::of(&site, Some(&record))))
    }

    /// The passcode's info, counting every failure refused before the call.
    pub async fn company_passcode_info(&self, site_id: &str) -> Result<CompanyPasscodeInfo> {
        self.failed_attempts.settled().await;
        let site = self.site(site_id).await?;
        let record = self.store.get_passcode(site_id).await?;
        Ok(CompanyPasscodeInfo::of(&site, record.as_ref()))
    }

    /// Turns self-service enrollment off until a new passcode is generated.
    pub async fn disable_company_passcode(
        &self,
        site_id: &str,
        admin_email: &str,
    ) -> Result<CompanyPasscodeInfo> {
        let site = self.site(site_id).await?;
        let record = self
            .store
            .update_passcode(
                site_id,
                Box::new(|record| {
                    let change = record.state == PasscodeState::Enabled;
                    if change {
                        record.state = PasscodeState::Disabled;
                    }
                    change
                }),
            )
            .await?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "site {site_id:?} has no company passcode to disable; generate one first"
                ))
            })?;
        tracing::info!(site_id, admin = admin_email, "company passcode disabled");
        Ok(CompanyPasscodeInfo::of(&site, Some(&record)))
    }

    /// Checks `passcode` for a user `email` coming from `source`.
    ///
    /// A wrong passcode given with the email of a user of a site counts as a
    /// failed attempt on that site; the attempt that reaches the site's limit
    /// locks the passcode out, records an alert and queues a notification to
    /// every admin of the site. A source that keeps failing is throttled.
    /// A refusal returns before its failure is counted (see the module doc);
    /// a success first waits for every failure refused before it.
    pub async fn verify_company_passcode(
        &self,
        email: &str,
        passcode: &str,
        source: IpAddr,
    ) -> Result<std::result::Result<VerifiedPasscode, Refusal>> {
        if !self.throttle.allows(source) {
            return Ok(Err(Refusal::Throttled(source)));
        }
        let email = email.trim().to_ascii_lowercase();
        let quiet = self.failed_attempts.quiet_mark();
        let refusal = match self.check_passcode(&email, passcode).await? {
            Ok(verified) if self.failed_attempts.quiet_since(quiet) => Ok(verified),
            Ok(_) => {
                // One of the failures still being counted may lock this site out.
                self.failed_attempts.settled().await;
                self.check_passcode(&email, passcode).await?
            }
            refusal => refusal,
        };
        let refusal = match refusal {
            // The enrollment that follows records the passcode's use
            // (`enroll_device`), in its own write.
            Ok(verified) => return Ok(Ok(verified)),
            Err(refusal) => refusal,
        };
        self.throttle.record_failure(source);
        let counts = refusal == Refusal::WrongPasscode || refusal == Refusal::Malformed;
        // Every refusal queues a job, counted or not, so each takes one path.
        self.failed_attempts
            .queue(counts.then_some(email), source)
            .await;
        Ok(Err(refusal))
    }

    /// Waits until every failure refused so far is counted and durable.
    pub async fn settle_failed_attempts(&self) {
        self.failed_attempts.settled().await;
    }

    async fn check_passcode(
        &self,
        email: &str,
        passcode: &str,
    ) -> Result<std::result::Result<VerifiedPasscode, Refusal>> {
        if passcode.len() != PASSCODE_LENGTH || !passcode.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Ok(Err(Refusal::Malformed));
        }
        let hash = self.passcode_hash(passcode);
        // The same two look-ups whether the passcode names a site or not, so
        // a refusal takes as long for a right passcode as for a wrong one.
        let site_id = self.store.site_for_passcode_hash(&hash).await?;
        let user = self
            .store
            .get_user(site_id.as_deref().unwrap_or_default(), email)
            .await?;
        let Some(site_id) = site_id else {
            return Ok(Err(Refusal::WrongPasscode));
        };
        let Some(user) = user else {
            return Ok(Err(Refusal::NotAUser(site_id)));
        };
        let Some(record) = self.store.get_passcode(&site_id).await? else {
            return Ok(Err(Refusal::WrongPasscode));
        };
        let stored = hex::decode(&record.hash).unwrap_or_default();
        if !bool::from(stored.as_slice().ct_eq(hash.as_slice())) {
            return Ok(Err(Refusal::WrongPasscode));
        }
        match record.state {
            PasscodeState::Enabled => {}
            PasscodeState::Disabled | PasscodeState::NotGenerated => {
                return Ok(Err(Refusal::Disabled(site_id)));
            }
            PasscodeState::LockedOut => return Ok(Err(Refusal::LockedOut(site_id))),
        }
        let site = self.site(&site_id).await?;
        Ok(Ok(VerifiedPasscode { site, user }))
    }
}

/// What counting failures needs, shared with the task that counts them.
#[derive(Debug, Clone)]
struct FailureCounter {
    store: Arc<dyn Store>,
    registry: Arc<AdminRegistry>,
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
        let notifications = crate::alerts::notifications(
            &self.registry,
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

/// The failed-attempt bookkeeping: one thread of the blocking pool, started
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
        registry: Arc<AdminRegistry>,
        alerts: broadcast::Sender<Alert>,
        outbox_wake: Arc<Notify>,
    ) -> Self {
        Self {
            counter: FailureCounter {
                store,
                registry,
                alerts,
                outbox_wake,
            },
            queue: Mutex::new(Queue::NotStarted),
            refusals_queued: AtomicU64::new(0),
            refusals_counted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A mark when no refusal is being counted right now; see [`Self::quiet_since`].
    fn quiet_mark(&self) -> Option<u64> {
        let queued = self.refusals_queued.load(Ordering::SeqCst);
        (self.refusals_counted.load(Ordering::SeqCst) == queued).then_some(queued)
    }

    /// Whether no refusal was queued since `mark` was taken: then no count
    /// can have changed a passcode's state in between.
    fn quiet_since(&self, mark: Option<u64>) -> bool {
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
    async fn queue(&self, email: Option<String>, source: IpAddr) {
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
    async fn settled(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passcodes_have_the_right_shape_over_ten_thousand_generations() {
        let mut seen = std::collections::HashSet::new();
        let mut position_classes = [[0u32; 3]; PASSCODE_LENGTH];
        for _ in 0..10_000 {
            let passcode = CompanyPasscode::generate();
            let text = passcode.expose();
            assert_eq!(text.len(), PASSCODE_LENGTH);
            assert!(text.bytes().all(|b| b.is_ascii_alphanumeric()), "{text}");
            assert!(text.bytes().any(|b| b.is_ascii_digit()));
            assert!(text.bytes().any(|b| b.is_ascii_lowercase()));
            assert!(text.bytes().any(|b| b.is_ascii_uppercase()));
            for (i, b) in text.bytes().enumerate() {
                let class = if b.is_ascii_digit() {
                    0
                } else if b.is_ascii_lowercase() {
                    1
                } else {
                    2
                };
                position_classes[i][class] += 1;
            }
            assert!(seen.insert(text.to_owned()), "duplicate passcode");
        }
        // Every class shows up at every position: no fixed layout.
        for counts in position_classes {
            assert!(counts.iter().all(|&c| c > 500), "{counts:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_passcode() {
        let passcode = CompanyPasscode::generate();
        let debug = format!("{passcode:?}");
        assert!(!debug.contains(passcode.expose()));
    }
}
