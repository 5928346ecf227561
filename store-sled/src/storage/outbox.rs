//! The audit trail, alerts and the notification outbox.

use super::*;

impl Storage {
    pub fn append_audit(&self, device_id: &str, entry: &AuditEntry) -> Result<(), StorageError> {
        self.device_audit.insert(
            key2(device_id, &mdm_core::model::time_ordered_id()),
            encode(entry),
        )?;
        Ok(())
    }

    /// The device's audit trail, newest first, at most `limit` entries.
    pub fn list_audit(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        self.device_audit
            .scan_prefix(prefix(device_id))
            .rev()
            .take(limit)
            .map(|entry| decode(&entry?.1))
            .collect()
    }

    /// Stores a notification; the pending index entry goes in before a
    /// pending record and comes out after a final one.
    pub fn put_notification(&self, notification: &Notification) -> Result<(), StorageError> {
        let id = notification.notification_id.as_bytes();
        let pending = notification.state == NotificationState::Pending;
        if pending {
            self.outbox_pending.insert(id, &[])?;
        }
        self.outbox.insert(id, encode(notification))?;
        if !pending {
            self.outbox_pending.remove(id)?;
        }
        Ok(())
    }

    /// Removes a notification: the record first, then its pending entry.
    pub fn remove_notification(&self, notification_id: &str) -> Result<(), StorageError> {
        let id = notification_id.as_bytes();
        self.outbox.remove(id)?;
        self.outbox_pending.remove(id)?;
        Ok(())
    }

    /// Notifications still to deliver, oldest first.
    pub fn pending_notifications(&self) -> Result<Vec<Notification>, StorageError> {
        let mut pending = Vec::new();
        for key in self.outbox_pending.iter().keys() {
            let key = key?;
            match self.outbox.get(&key)? {
                Some(bytes) => {
                    let notification: Notification = decode(&bytes)?;
                    if notification.state == NotificationState::Pending {
                        pending.push(notification);
                    } else {
                        self.outbox_pending.remove(&key)?;
                    }
                }
                None => {
                    self.outbox_pending.remove(&key)?;
                }
            }
        }
        Ok(pending)
    }

    /// A site's alerts, newest first.
    pub fn list_alerts(
        &self,
        site_id: &str,
        page_token: &str,
        limit: usize,
    ) -> Result<Page<Alert>, StorageError> {
        page(
            &self.alerts,
            b"alerts\0",
            &prefix(site_id),
            page_token,
            limit,
            true,
            |_, v| decode(v).map(Some),
        )
    }

    /// Notifications of a site (all sites when `site_id` is None), oldest first.
    pub fn list_notifications(
        &self,
        site_id: Option<&str>,
        state: Option<NotificationState>,
        page_token: &str,
        limit: usize,
    ) -> Result<Page<Notification>, StorageError> {
        // A token of one site's list is not one of all sites'.
        let list = match site_id {
            Some(site_id) => key3("notifications", &format!("={site_id}"), ""),
            None => key3("notifications", "*", ""),
        };
        page(
            &self.outbox,
            &list,
            b"",
            page_token,
            limit,
            false,
            |_, v| {
                let n: Notification = decode(v)?;
                let keep =
                    site_id.is_none_or(|s| n.site_id == s) && state.is_none_or(|st| n.state == st);
                Ok(keep.then_some(n))
            },
        )
    }
}
