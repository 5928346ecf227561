//! The store contract on sled: [`Storage`]'s ordered writes under its own
//! locks, made durable by its group commit before an operation returns
//! (except those the contract lets be durable soon: sled flushes every
//! 500 ms by itself).

use std::sync::Arc;

use async_trait::async_trait;
use mdm_core::model::{
    Action, ActionStatus, ActionType, Alert, AuditEntry, CompanyPasscodeRecord, Device,
    Notification, NotificationState, Site, User, now_millis,
};
use mdm_core::rules::{self, AgentReport};
use mdm_core::store::{
    ActionFilter, Canceled, Change, CommandStore, Delivery, DeviceFilter, DeviceStore, Enrolled,
    FailedAttempt, FailedAttemptEntry, LockoutAlert, NewCommand, OutboxStore, Page, PageRequest,
    Queued, Reported, SiteFilter, SiteStore, Store, StoreError, StoreResult, UsersInserted,
};

use crate::storage::{Storage, StorageError};

impl From<StorageError> for StoreError {
    fn from(error: StorageError) -> Self {
        if error.is_disk_full() {
            return StoreError::DiskFull;
        }
        match error {
            StorageError::BadPageToken => StoreError::BadPageToken,
            StorageError::Corrupt(what) => StoreError::Corrupt(what),
            other => StoreError::Backend(Box::new(other)),
        }
    }
}

/// Runs sled work that may wait on a lock held for long (an import of
/// thousands of users) on the blocking pool, so runtime workers keep serving.
async fn off_the_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::Backend(Box::new(StorageError::Stopped(error.to_string()))))?
        .map_err(StoreError::from)
}

impl Storage {
    async fn durable<T>(&self, value: T) -> StoreResult<T> {
        self.flush_async().await?;
        Ok(value)
    }
}

#[async_trait]
impl SiteStore for Storage {
    async fn insert_site(&self, site: &Site) -> StoreResult<bool> {
        let inserted = Storage::insert_site(self, site)?;
        self.durable(inserted).await
    }

    async fn get_site(&self, site_id: &str) -> StoreResult<Option<Site>> {
        Ok(Storage::get_site(self, site_id)?)
    }

    async fn update_site(
        &self,
        site_id: &str,
        change: Change<'_, Site>,
    ) -> StoreResult<Option<Site>> {
        let site = Storage::update_site(self, site_id, change)?;
        self.durable(site).await
    }

    async fn list_sites(
        &self,
        filter: &SiteFilter,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Site>> {
        Ok(Storage::list_sites(self, page.token, page.limit, |site| {
            filter
                .only
                .as_ref()
                .is_none_or(|only| only.contains(&site.site_id))
        })?)
    }

    async fn site_has_webhook(&self, site_id: &str) -> StoreResult<bool> {
        Ok(Storage::site_has_webhook(self, site_id))
    }

    async fn insert_users(
        &self,
        site_id: &str,
        users: &[User],
        max_users: usize,
    ) -> StoreResult<UsersInserted> {
        let (storage, site_id, users) = (self.clone(), site_id.to_owned(), users.to_vec());
        let inserted =
            off_the_runtime(move || storage.insert_users(&site_id, &users, max_users)).await?;
        self.durable(inserted).await
    }

    async fn get_user(&self, site_id: &str, email: &str) -> StoreResult<Option<User>> {
        Ok(Storage::get_user(self, site_id, email)?)
    }

    async fn get_user_by_id(&self, user_id: &str) -> StoreResult<Option<User>> {
        Ok(Storage::get_user_by_id(self, user_id)?)
    }

    async fn list_users(&self, site_id: &str, page: PageRequest<'_>) -> StoreResult<Page<User>> {
        Ok(Storage::list_users(self, site_id, page.token, page.limit)?)
    }

    async fn delete_user(&self, user_id: &str) -> StoreResult<Option<User>> {
        let (storage, user_id) = (self.clone(), user_id.to_owned());
        let user = off_the_runtime(move || storage.delete_user(&user_id)).await?;
        self.durable(user).await
    }

    async fn sites_of_email(&self, email: &str) -> StoreResult<Vec<String>> {
        Ok(Storage::sites_of_email(self, email)?)
    }

    async fn get_passcode(&self, site_id: &str) -> StoreResult<Option<CompanyPasscodeRecord>> {
        Ok(Storage::get_passcode(self, site_id)?)
    }

    async fn replace_passcode(&self, record: &CompanyPasscodeRecord) -> StoreResult<()> {
        Storage::replace_passcode(self, record)?;
        self.durable(()).await
    }

    async fn update_passcode(
        &self,
        site_id: &str,
        change: Change<'_, CompanyPasscodeRecord>,
    ) -> StoreResult<Option<CompanyPasscodeRecord>> {
        let record = Storage::update_passcode(self, site_id, change)?;
        self.durable(record).await
    }

    async fn site_for_passcode_hash(&self, hash: &[u8]) -> StoreResult<Option<String>> {
        Ok(Storage::site_for_passcode_hash(self, hash)?)
    }

    async fn record_failed_attempts(
        &self,
        attempts: &[FailedAttemptEntry],
        lockout: LockoutAlert<'_>,
    ) -> StoreResult<Vec<FailedAttempt>> {
        let mut outcomes = Vec::with_capacity(attempts.len());
        for attempt in attempts {
            let site = &attempt.site;
            outcomes.push(Storage::record_failed_attempt(
                self,
                &site.site_id,
                site.failed_attempt_limit,
                attempt.at,
                &attempt.source,
                |record| lockout(site, record),
            )?);
        }
        if outcomes.iter().any(|o| *o != FailedAttempt::NotEnabled) {
            self.flush_async().await?;
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl DeviceStore for Storage {
    async fn enroll_device(
        &self,
        device: &mut Device,
        proven: Option<&str>,
    ) -> StoreResult<Enrolled> {
        let enrolled = Storage::enroll_device(self, device, proven)?;
        // Counted after the device is stored: a crash in between loses one
        // count, never a device.
        let now = now_millis();
        Storage::update_passcode(self, &device.site_id, |record| {
            record.enrollments += 1;
            record.last_used_at = Some(now);
            true
        })?;
        self.durable(enrolled).await
    }

    async fn get_device(&self, device_id: &str) -> StoreResult<Option<Arc<Device>>> {
        Ok(Storage::get_device(self, device_id)?)
    }

    async fn update_device(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
    ) -> StoreResult<Option<Device>> {
        let device = Storage::update_device(self, device_id, change)?;
        self.durable(device).await
    }

    async fn update_device_soon(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
    ) -> StoreResult<Option<Device>> {
        Ok(Storage::update_device(self, device_id, change)?)
    }

    async fn list_devices(
        &self,
        site_id: &str,
        filter: &DeviceFilter,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Device>> {
        Ok(Storage::list_devices(
            self,
            site_id,
            page.token,
            page.limit,
            |device| filter.matches(device),
        )?)
    }

    async fn append_audit(&self, device_id: &str, entry: &AuditEntry) -> StoreResult<()> {
        Storage::append_audit(self, device_id, entry)?;
        self.durable(()).await
    }

    async fn list_audit(&self, device_id: &str, limit: usize) -> StoreResult<Vec<AuditEntry>> {
        Ok(Storage::list_audit(self, device_id, limit)?)
    }
}

#[async_trait]
impl CommandStore for Storage {
    fn new_action_id(&self, site_id: &str) -> String {
        crate::storage::new_action_id(site_id)
    }

    async fn queue_command(&self, command: NewCommand) -> StoreResult<Queued> {
        let queued = self.store_command(command)?;
        self.durable(queued).await
    }

    async fn record_action(&self, action: &Action) -> StoreResult<()> {
        Storage::put_action(self, action)?;
        self.durable(()).await
    }

    async fn mark_sent(
        &self,
        device_id: &str,
        action_ids: &[String],
        now: i64,
    ) -> StoreResult<Vec<Delivery>> {
        let mut deliveries = Vec::with_capacity(action_ids.len());
        for action_id in action_ids {
            let updated = self.update_device_action(device_id, action_id, |action| {
                rules::mark_sent(action, now)
            })?;
            deliveries.push(match updated {
                Some((action, true)) => Delivery::First(Box::new(action)),
                Some((action, false)) if action.is_queued() && action.device_id == device_id => {
                    Delivery::Again
                }
                _ => Delivery::Withdrawn,
            });
        }
        if deliveries.iter().any(|d| matches!(d, Delivery::First(_))) {
            self.flush_async().await?;
        }
        Ok(deliveries)
    }

    async fn apply_reports(
        &self,
        device_id: &str,
        action_id: &str,
        reports: &[AgentReport],
        now: i64,
    ) -> StoreResult<Reported> {
        let mut steps = Vec::new();
        let updated = self.update_device_action(device_id, action_id, |action| {
            for report in reports {
                if rules::apply_report(action, report, now) {
                    steps.push(action.clone());
                }
            }
            !steps.is_empty()
        })?;
        Ok(match updated {
            None => Reported::Unknown,
            Some((action, _)) if action.device_id != device_id => Reported::OtherDevice,
            Some(_) => Reported::Applied(steps),
        })
    }

    async fn cancel_action(&self, action_id: &str, by: &str, now: i64) -> StoreResult<Canceled> {
        let mut refused = None;
        let updated =
            self.update_action(action_id, |action| match rules::cancel(action, by, now) {
                Ok(()) => true,
                Err(status) => {
                    refused = Some(status);
                    false
                }
            })?;
        let Some((action, _)) = updated else {
            return Ok(Canceled::NotFound);
        };
        if let Some(status) = refused {
            return Ok(Canceled::Refused(status));
        }
        self.durable(Canceled::Done(Box::new(action))).await
    }

    async fn expire_due(&self, now: i64) -> StoreResult<Vec<Action>> {
        let mut expired = Vec::new();
        for action_id in self.expired_action_ids(now) {
            if let Some((action, true)) =
                self.update_action(&action_id, |action| rules::expire(action, now))?
            {
                expired.push(action);
            }
        }
        self.record_open_commands_since()?;
        if !expired.is_empty() {
            self.flush_async().await?;
        }
        Ok(expired)
    }

    async fn queued_actions(&self, device_id: &str) -> StoreResult<Vec<Action>> {
        Ok(Storage::queued_actions(self, device_id)?)
    }

    async fn get_action(&self, action_id: &str) -> StoreResult<Option<Action>> {
        Ok(Storage::get_action(self, action_id)?)
    }

    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Action>> {
        Ok(Storage::list_actions(
            self,
            &filter.site_id,
            filter.device_id.as_deref(),
            page.token,
            page.limit,
            |action| filter.matches(action),
        )?)
    }

    async fn device_has_action(
        &self,
        device_id: &str,
        kinds: &[ActionType],
        status: ActionStatus,
    ) -> StoreResult<bool> {
        Ok(Storage::device_has_action(self, device_id, |action| {
            action.status == status && kinds.contains(&action.action_type)
        })?)
    }
}

#[async_trait]
impl OutboxStore for Storage {
    async fn put_alert(&self, alert: &Alert, notifications: &[Notification]) -> StoreResult<()> {
        Storage::put_alert(self, alert, notifications)?;
        self.durable(()).await
    }

    async fn put_notification(&self, notification: &Notification) -> StoreResult<()> {
        Ok(Storage::put_notification(self, notification)?)
    }

    async fn pending_notifications(&self) -> StoreResult<Vec<Notification>> {
        let storage = self.clone();
        off_the_runtime(move || storage.pending_notifications()).await
    }

    async fn list_alerts(&self, site_id: &str, page: PageRequest<'_>) -> StoreResult<Page<Alert>> {
        Ok(Storage::list_alerts(self, site_id, page.token, page.limit)?)
    }

    async fn list_notifications(
        &self,
        site_id: Option<&str>,
        state: Option<NotificationState>,
        page: PageRequest<'_>,
    ) -> StoreResult<Page<Notification>> {
        Ok(Storage::list_notifications(
            self, site_id, state, page.token, page.limit,
        )?)
    }
}

#[async_trait]
impl Store for Storage {
    async fn close(&self) -> StoreResult<()> {
        Ok(self.flush()?)
    }
}
