//! Reading every record out of the sled database, for a move to another
//! backend (`migrate`). Only the record trees are read: the indexes
//! (`user_ids`, `user_sites`, `passcode_hashes`, `site_devices`,
//! `device_serials`, `device_actions`, `legacy_action_keys`,
//! `outbox_pending`) are derived from the records, and any dangling entry
//! a crash left in one is simply not looked at. The legacy trees of older
//! schemas are empty once [`Storage::open`] has upgraded the database, so
//! actions come from the `actions` tree alone.

use mdm_core::snapshot::{DeviceAuditEntry, Snapshot};
use serde::de::DeserializeOwned;

use super::{Storage, StorageError, decode, decode_action};

/// Every value of `tree`, decoded, in key order.
fn values<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, StorageError> {
    tree.iter().values().map(|value| decode(&value?)).collect()
}

impl Storage {
    /// Every record the database holds, as domain values: sites, users,
    /// company passcode records, devices (every status), actions with their
    /// timelines, each device's audit trail (oldest first), alerts, and the
    /// outbox in every state. Records come in key order: sites, devices and
    /// notifications by id, users by site and email, actions by site tag
    /// and id, alerts by site and id, audit entries by device and time.
    pub fn export(&self) -> Result<Snapshot, StorageError> {
        let actions = self
            .actions
            .iter()
            .values()
            .map(|value| decode_action(&value?))
            .collect::<Result<Vec<_>, _>>()?;
        let mut audit = Vec::with_capacity(self.device_audit.len());
        for entry in self.device_audit.iter() {
            let (key, value) = entry?;
            // device_id \0 entry id: the entry id (a UUID) has no NUL.
            let at = key.iter().rposition(|b| *b == 0).ok_or_else(|| {
                StorageError::Corrupt("an audit entry's key has no device id".into())
            })?;
            audit.push(DeviceAuditEntry {
                device_id: String::from_utf8_lossy(&key[..at]).into_owned(),
                entry: decode(&value)?,
            });
        }
        Ok(Snapshot {
            sites: values(&self.sites)?,
            users: values(&self.users)?,
            passcodes: values(&self.passcodes)?,
            devices: values(&self.devices)?,
            actions,
            audit,
            alerts: values(&self.alerts)?,
            notifications: values(&self.outbox)?,
        })
    }
}
