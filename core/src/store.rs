//! The store contract: what the domain asks of a backend, as operations on
//! domain values. Every backend (embedded sled, PostgreSQL) implements
//! [`Store`] and passes the same conformance suite (the `mdm-store-tests`
//! crate: a behaviour it checks is part of this contract).
//!
//! Guarantees every backend gives (ARCHITECTURE.md, "The store contract"):
//! - Each operation is one unit: when it returns an error it stored nothing
//!   a reader can see (a backend may leave unreachable rows it cleans up).
//! - A mutating operation is durable when it returns, unless its doc says
//!   "durable soon" (then it is durable within a second, and losing it in a
//!   crash is harmless by design: reports are re-sent, `last_seen` refreshed).
//! - Operations on one device's commands are serialised per device, so the
//!   rules in [`crate::rules`] see every change before theirs.
//! - Lists are ordered (documented per list) and paged with opaque tokens a
//!   backend made; a token it did not make is [`StoreError::BadPageToken`].
//!   A token belongs to one list and scope: the site of a site's users,
//!   devices, alerts or actions, the device of a device's actions, one
//!   site's notifications or all sites'. The same list of another scope
//!   refuses it too.
//! - Ids are made by the domain, except action ids ([`CommandStore::new_action_id`]),
//!   which a backend may shape to find records fast; they stay opaque strings.
//!   Where an operation's doc says a taken id (or a record that is not
//!   there) refuses it, the operation fails with [`StoreError::Backend`] and
//!   stores nothing.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{
    Action, ActionStatus, ActionType, Alert, AuditEntry, CompanyPasscodeRecord, Device,
    DeviceStatus, LatestReset, Millis, Notification, NotificationState, Platform, Site, User,
};
use crate::rules::AgentReport;

/// A backend's failure. Domain code maps it to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("page_token is not one this list returned")]
    BadPageToken,
    /// The database cannot be reached now; the call may be retried.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("the disk under the database is full")]
    DiskFull,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Any other failure, also an operation refused because it would
    /// overwrite a record (a taken id) or names one that is not there.
    #[error("database error: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Where a page starts and how long it is.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    /// Empty for the first page, else a `next_page_token` of this list.
    pub token: &'a str,
    pub limit: usize,
}

/// One page of a listing, and the token for the next one (empty at the end).
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

/// Which sites a listing returns.
#[derive(Debug, Clone, Default)]
pub struct SiteFilter {
    /// Only these sites; all when None.
    pub only: Option<Vec<String>>,
}

/// Which devices of a site a listing returns; unset fields match all.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub platform: Option<Platform>,
    pub status: Option<DeviceStatus>,
    /// Lower-case email; empty matches all.
    pub user_email: String,
}

/// Which actions a listing returns; unset fields match all.
#[derive(Debug, Clone)]
pub struct ActionFilter {
    pub site_id: String,
    /// One device's actions (of `site_id`) instead of the whole site's.
    pub device_id: Option<String>,
    pub action_type: Option<ActionType>,
    pub status: Option<ActionStatus>,
    /// Lower-case email; empty matches all.
    pub created_by: String,
    pub created_at_or_after: Option<Millis>,
    pub created_before: Option<Millis>,
}

impl ActionFilter {
    pub fn site(site_id: impl Into<String>) -> Self {
        Self {
            site_id: site_id.into(),
            device_id: None,
            action_type: None,
            status: None,
            created_by: String::new(),
            created_at_or_after: None,
            created_before: None,
        }
    }

    /// Whether `action` passes (for backends that filter in memory).
    pub fn matches(&self, action: &Action) -> bool {
        action.site_id == self.site_id
            && self
                .device_id
                .as_ref()
                .is_none_or(|d| &action.device_id == d)
            && self.action_type.is_none_or(|t| action.action_type == t)
            && self.status.is_none_or(|s| action.status == s)
            && (self.created_by.is_empty() || action.created_by == self.created_by)
            && self
                .created_at_or_after
                .is_none_or(|t| action.created_at >= t)
            && self.created_before.is_none_or(|t| action.created_at < t)
    }
}

impl DeviceFilter {
    pub fn matches(&self, device: &Device) -> bool {
        self.platform.is_none_or(|p| device.facts.platform == p)
            && self.status.is_none_or(|s| device.status == s)
            && (self.user_email.is_empty() || device.user_email == self.user_email)
    }
}

/// What inserting users did.
#[derive(Debug, PartialEq, Eq)]
pub enum UsersInserted {
    /// Stored, but for the users at these indexes: the site had their email.
    Inserted { existing: Vec<usize> },
    /// Nothing stored: the site has `users` users and the new ones would
    /// pass its limit.
    OverQuota { users: usize },
}

/// One wrong company passcode to count against a site.
#[derive(Debug, Clone)]
pub struct FailedAttemptEntry {
    pub site: Site,
    pub source: String,
    pub at: Millis,
}

/// What counting a wrong company passcode did.
#[derive(Debug, PartialEq, Eq)]
pub enum FailedAttempt {
    /// Counted; the passcode is still enabled.
    Counted { failed_attempts: u32 },
    /// This attempt reached the limit: the passcode is now locked out and
    /// the alert (with its notifications) was stored.
    LockedOut(Box<Alert>),
    /// The passcode was not enabled, so nothing was counted.
    NotEnabled,
}

/// The alert (and its notifications) of a lockout, made from the site and
/// the record as it locks out.
pub type LockoutAlert<'a> =
    &'a (dyn Fn(&Site, &CompanyPasscodeRecord) -> (Alert, Vec<Notification>) + Sync);

/// What storing an enrolled device did to the devices before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    New,
    /// The client proved it is this device, now `REPLACED`.
    Replacing(String),
    /// This active device of the site has the same serial number and stays.
    AlongsideSameSerial(String),
}

/// A change to a record, run inside the operation's unit; it returns false
/// to leave the record as it was.
pub type Change<'a, T> = Box<dyn FnOnce(&mut T) -> bool + Send + 'a>;

/// A new command, validated, for [`CommandStore::queue_command`].
#[derive(Debug)]
pub struct NewCommand {
    /// PENDING, with its payload and expiry.
    pub action: Action,
    /// Whether the device's stream is live here: the command is then
    /// stored as SENT when no older command waits (see [`crate::rules::plan_queue`]).
    pub online: bool,
    /// Stored in the same unit (a reset's emails).
    pub notifications: Vec<Notification>,
    /// Set as the device's latest reset in the same unit.
    pub latest_reset: Option<LatestReset>,
}

/// What queueing a command stored.
#[derive(Debug)]
pub struct Queued {
    pub action: Action,
    /// Older commands it canceled.
    pub superseded: Vec<Action>,
    /// Stored as SENT: hand it to the stream now.
    pub direct: bool,
}

/// Whether a queued command goes out on a stream.
#[derive(Debug)]
pub enum Delivery {
    /// Sent for the first time: now SENT.
    First(Box<Action>),
    /// Sent before, on an earlier stream, and not finished: send it again.
    Again,
    /// No longer to be delivered: canceled or superseded meanwhile.
    Withdrawn,
}

/// What applying an agent's reports did.
#[derive(Debug)]
pub enum Reported {
    /// No such action.
    Unknown,
    /// The action is another device's; nothing changed.
    OtherDevice,
    /// Each step the reports made, in order (empty when none changed it).
    Applied(Vec<Action>),
}

/// What canceling did.
#[derive(Debug)]
pub enum Canceled {
    NotFound,
    /// The action is this far along; it cannot be canceled.
    Refused(ActionStatus),
    Done(Box<Action>),
}

/// Sites, their users and their company passcodes.
#[async_trait]
pub trait SiteStore: Send + Sync + std::fmt::Debug {
    /// Stores a new site; false when the id is taken (the stored site
    /// stays as it was).
    async fn insert_site(&self, site: &Site) -> StoreResult<bool>;
    async fn get_site(&self, site_id: &str) -> StoreResult<Option<Site>>;
    /// Changes a site (concurrent changes of different settings do not undo
    /// each other); the site after, or None when there is none.
    async fn update_site(
        &self,
        site_id: &str,
        change: Change<'_, Site>,
    ) -> StoreResult<Option<Site>>;
    /// Sites ordered by id.
    async fn list_sites(
        &self,
        filter: &SiteFilter,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Site>>;
    /// Whether the site has a webhook, as stored (also right after the
    /// insert that gave it one); asked on every action change, so a
    /// backend answers it without a round trip when it can.
    async fn site_has_webhook(&self, site_id: &str) -> StoreResult<bool>;

    /// Inserts users of one site, skipping (and returning the indexes of)
    /// those whose email the site already has, or an earlier user of the
    /// batch has (the first of them is stored); all or none, and nothing
    /// (`OverQuota`) when the site's users and the new ones would be more
    /// than `max_users`. A new user whose id is taken, by a stored user of
    /// any site or an earlier new user of the batch, fails the batch.
    async fn insert_users(
        &self,
        site_id: &str,
        users: &[User],
        max_users: usize,
    ) -> StoreResult<UsersInserted>;
    async fn get_user(&self, site_id: &str, email: &str) -> StoreResult<Option<User>>;
    async fn get_user_by_id(&self, user_id: &str) -> StoreResult<Option<User>>;
    /// A site's users ordered by email.
    async fn list_users(&self, site_id: &str, page: PageRequest<'_>) -> StoreResult<Page<User>>;
    /// Removes a user; returns it, or None when there was none.
    async fn delete_user(&self, user_id: &str) -> StoreResult<Option<User>>;
    /// Ids of the sites that have a user with this (lower-case) email, in
    /// id order.
    async fn sites_of_email(&self, email: &str) -> StoreResult<Vec<String>>;

    async fn get_passcode(&self, site_id: &str) -> StoreResult<Option<CompanyPasscodeRecord>>;
    /// Replaces the site's passcode: the old one stops working at once.
    async fn replace_passcode(&self, record: &CompanyPasscodeRecord) -> StoreResult<()>;
    /// Changes the site's passcode record; the record after.
    async fn update_passcode(
        &self,
        site_id: &str,
        change: Change<'_, CompanyPasscodeRecord>,
    ) -> StoreResult<Option<CompanyPasscodeRecord>>;
    /// The site whose current passcode has this keyed hash.
    async fn site_for_passcode_hash(&self, hash: &[u8]) -> StoreResult<Option<String>>;
    /// Counts wrong passcodes, in order ([`crate::rules::count_failed_attempt`]).
    /// The attempt that reaches a site's limit locks its passcode out and
    /// stores `lockout`'s alert and notifications in the same unit, so
    /// concurrent attempts neither skip the limit nor raise two alerts.
    async fn record_failed_attempts(
        &self,
        attempts: &[FailedAttemptEntry],
        lockout: LockoutAlert<'_>,
    ) -> StoreResult<Vec<FailedAttempt>>;
}

/// Enrolled devices and their audit trails.
#[async_trait]
pub trait DeviceStore: Send + Sync + std::fmt::Debug {
    /// Stores a newly enrolled device and counts the enrollment on its
    /// site's passcode record (`enrollments`, `last_used_at`). `proven` is
    /// the device the client proved to be (by its current certificate): an
    /// active device of the same site and serial number is then replaced by
    /// the new one (`device.replaces_device_id` is set). A serial number
    /// alone proves nothing: an active device claiming it stays enrolled.
    /// Otherwise the new device is checked against every active device of
    /// its site with its serial number (a blank one matches none), and
    /// `AlongsideSameSerial` names the one of them enrolled last (by
    /// `enrolled_at`, then id). A device id that is taken (by a device of any
    /// site) fails the operation: nothing stored, replaced or counted.
    async fn enroll_device(
        &self,
        device: &mut Device,
        proven: Option<&str>,
    ) -> StoreResult<Enrolled>;
    async fn get_device(&self, device_id: &str) -> StoreResult<Option<Arc<Device>>>;
    /// Changes a device; the device after, or None when there is none.
    /// A change keeps the device's id, site and serial number (what
    /// enrollment checked; a backend may index them).
    async fn update_device(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
    ) -> StoreResult<Option<Device>>;
    /// [`update_device`](Self::update_device), durable soon: what the agent
    /// says about itself (last seen, facts, compliance).
    async fn update_device_soon(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
    ) -> StoreResult<Option<Device>>;
    /// A site's devices ordered by id.
    async fn list_devices(
        &self,
        site_id: &str,
        filter: &DeviceFilter,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Device>>;
    async fn append_audit(&self, device_id: &str, entry: &AuditEntry) -> StoreResult<()>;
    /// The device's audit trail, newest first, at most `limit` entries.
    async fn list_audit(&self, device_id: &str, limit: usize) -> StoreResult<Vec<AuditEntry>>;
}

/// Commands and the action log.
#[async_trait]
pub trait CommandStore: Send + Sync + std::fmt::Debug {
    /// A new action id for a record of `site_id`; later calls make ids that
    /// sort after (the action log's order).
    fn new_action_id(&self, site_id: &str) -> String;
    /// Queues a command: supersedes older ones ([`crate::rules::plan_queue`]),
    /// stores the command, its notifications and the device's latest reset,
    /// as one unit. A command for a device that is not stored, or with a
    /// notification whose id is taken (or repeated in it), fails and stores
    /// nothing.
    async fn queue_command(&self, command: NewCommand) -> StoreResult<Queued>;
    /// Stores an action that is final already (an unenroll).
    async fn record_action(&self, action: &Action) -> StoreResult<()>;
    /// Marks the device's commands SENT before they go out on its stream,
    /// one outcome per id, in order.
    async fn mark_sent(
        &self,
        device_id: &str,
        action_ids: &[String],
        now: Millis,
    ) -> StoreResult<Vec<Delivery>>;
    /// Applies the agent's reports about one of its commands, in order.
    /// Durable soon: a report lost in a crash is sent again by the agent.
    async fn apply_reports(
        &self,
        device_id: &str,
        action_id: &str,
        reports: &[AgentReport],
        now: Millis,
    ) -> StoreResult<Reported>;
    async fn cancel_action(&self, action_id: &str, by: &str, now: Millis) -> StoreResult<Canceled>;
    /// Expires every queued command whose time ran out, `expires_at <= now`
    /// ([`crate::rules::expire`]), each once also when sweeps run at the same
    /// time; those it expired, in no particular order.
    async fn expire_due(&self, now: Millis) -> StoreResult<Vec<Action>>;
    /// The device's commands not final yet, oldest first.
    async fn queued_actions(&self, device_id: &str) -> StoreResult<Vec<Action>>;
    async fn get_action(&self, action_id: &str) -> StoreResult<Option<Action>>;
    /// Actions newest first: in reverse order of their ids.
    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Action>>;
    /// Whether the device has an action of one of `kinds` in `status`.
    async fn device_has_action(
        &self,
        device_id: &str,
        kinds: &[ActionType],
        status: ActionStatus,
    ) -> StoreResult<bool>;
}

/// Alerts and the outbox of notifications.
#[async_trait]
pub trait OutboxStore: Send + Sync + std::fmt::Debug {
    /// Stores a security alert and the notifications it sends.
    async fn put_alert(&self, alert: &Alert, notifications: &[Notification]) -> StoreResult<()>;
    /// Stores a notification (new, or its delivery state changed). Durable soon: a
    /// webhook event or a delivery state lost in a crash is sent again (at least once).
    async fn put_notification(&self, notification: &Notification) -> StoreResult<()>;
    /// Notifications still to deliver, oldest first.
    async fn pending_notifications(&self) -> StoreResult<Vec<Notification>>;
    /// A site's alerts, newest first.
    async fn list_alerts(&self, site_id: &str, page: PageRequest<'_>) -> StoreResult<Page<Alert>>;
    /// A site's notifications (all sites' when None), oldest first.
    async fn list_notifications(
        &self,
        site_id: Option<&str>,
        state: Option<NotificationState>,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Notification>>;
}

/// Everything the domain stores, used as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: SiteStore + DeviceStore + CommandStore + OutboxStore {
    /// Makes everything written so far durable and lets go of the backend
    /// (for a clean stop).
    async fn close(&self) -> StoreResult<()>;
}
