//! Company passcodes: the hash index, failed attempts and the lockout
//! committed inside the passcode record.

use super::*;

impl Storage {
    pub fn get_passcode(
        &self,
        site_id: &str,
    ) -> Result<Option<CompanyPasscodeRecord>, StorageError> {
        self.passcodes
            .get(site_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Replaces the site's passcode. The record is the commit point: the
    /// new hash index entry is written before it, the old one removed after,
    /// and verification compares the hash in the record, so the old
    /// passcode stops working the moment the record changes.
    pub fn replace_passcode(&self, record: &CompanyPasscodeRecord) -> Result<(), StorageError> {
        let new_hash =
            hex::decode(&record.hash).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let _guard = hold(&self.passcode_lock);
        let old = self.get_passcode(&record.site_id)?;
        self.passcode_hashes
            .insert(new_hash.as_slice(), record.site_id.as_bytes())?;
        self.passcodes
            .insert(record.site_id.as_bytes(), encode(record))?;
        if let Some(old_hash) = old.and_then(|old| hex::decode(old.hash).ok())
            && old_hash != new_hash
        {
            self.passcode_hashes.remove(old_hash)?;
        }
        Ok(())
    }

    /// Changes the passcode record of a site under the passcode lock;
    /// `change` returns false to leave it as it was. Returns the record after.
    pub fn update_passcode(
        &self,
        site_id: &str,
        change: impl FnOnce(&mut CompanyPasscodeRecord) -> bool,
    ) -> Result<Option<CompanyPasscodeRecord>, StorageError> {
        let _guard = hold(&self.passcode_lock);
        let Some(mut record) = self.get_passcode(site_id)? else {
            return Ok(None);
        };
        if change(&mut record) {
            self.passcodes.insert(site_id.as_bytes(), encode(&record))?;
        }
        Ok(Some(record))
    }

    /// The site whose current passcode has this keyed hash.
    pub fn site_for_passcode_hash(&self, hash: &[u8]) -> Result<Option<String>, StorageError> {
        Ok(self
            .passcode_hashes
            .get(hash)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Counts one wrong passcode against a site. The attempt that reaches
    /// `limit` locks the passcode out and commits the alert and its
    /// notifications with it, under the passcode lock, so concurrent attempts
    /// can neither skip the limit nor raise two alerts.
    pub fn record_failed_attempt(
        &self,
        site_id: &str,
        limit: u32,
        now: Millis,
        source: &str,
        lockout: impl FnOnce(&CompanyPasscodeRecord) -> (Alert, Vec<Notification>),
    ) -> Result<FailedAttempt, StorageError> {
        let _guard = hold(&self.passcode_lock);
        let Some(mut record) = self.get_passcode(site_id)? else {
            return Ok(FailedAttempt::NotEnabled);
        };
        let Some(locks_out) =
            mdm_core::rules::count_failed_attempt(&mut record, limit, now, source)
        else {
            return Ok(FailedAttempt::NotEnabled);
        };
        if !locks_out {
            self.passcodes.insert(site_id.as_bytes(), encode(&record))?;
            return Ok(FailedAttempt::Counted {
                failed_attempts: record.failed_attempts,
            });
        }
        let (alert, notifications) = lockout(&record);
        record.pending_lockout = Some(PendingLockout {
            alert: alert.clone(),
            notifications,
        });
        self.passcodes.insert(site_id.as_bytes(), encode(&record))?;
        self.copy_pending_lockout(record)?;
        Ok(FailedAttempt::LockedOut(Box::new(alert)))
    }

    /// Copies a committed lockout into the alert log and the outbox, then
    /// clears it from the record. Idempotent: ids are fixed in the record.
    pub(super) fn copy_pending_lockout(
        &self,
        mut record: CompanyPasscodeRecord,
    ) -> Result<(), StorageError> {
        let Some(pending) = record.pending_lockout.take() else {
            return Ok(());
        };
        self.alerts.insert(
            key2(&pending.alert.site_id, &pending.alert.alert_id),
            encode(&pending.alert),
        )?;
        for notification in &pending.notifications {
            self.put_notification(notification)?;
        }
        self.passcodes
            .insert(record.site_id.as_bytes(), encode(&record))?;
        Ok(())
    }

    pub(super) fn finish_pending_lockouts(&self) -> Result<(), StorageError> {
        let _guard = hold(&self.passcode_lock);
        for entry in self.passcodes.iter() {
            let (_, value) = entry?;
            let record: CompanyPasscodeRecord = decode(&value)?;
            if record.pending_lockout.is_some() {
                tracing::warn!(site_id = %record.site_id, "finishing a lockout interrupted by a crash");
                self.copy_pending_lockout(record)?;
            }
        }
        Ok(())
    }
}
