//! Every record a deployment holds, as domain values: what one backend
//! exports and another imports when a deployment moves between them
//! (`mdm-server migrate`). Indexes are not part of it: each backend builds
//! its own from the records.

use std::fmt;

use crate::model::{
    Action, Alert, AuditEntry, CompanyPasscodeRecord, Device, Notification, Site, User,
};

/// One entry of a device's audit trail, with the device it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuditEntry {
    pub device_id: String,
    pub entry: AuditEntry,
}

/// Every record of a deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub sites: Vec<Site>,
    pub users: Vec<User>,
    /// Company passcode records, at most one per site.
    pub passcodes: Vec<CompanyPasscodeRecord>,
    /// Devices of every status (active, unenrolled, replaced).
    pub devices: Vec<Device>,
    /// The action log with every action's timeline; commands still queued
    /// are the actions with a payload and a status not final yet.
    pub actions: Vec<Action>,
    /// Each device's audit trail, oldest entry first (devices may come in
    /// any order, but one device's entries keep theirs).
    pub audit: Vec<DeviceAuditEntry>,
    pub alerts: Vec<Alert>,
    /// The outbox: notifications in every state.
    pub notifications: Vec<Notification>,
}

impl Snapshot {
    pub fn counts(&self) -> SnapshotCounts {
        SnapshotCounts {
            sites: self.sites.len(),
            users: self.users.len(),
            passcodes: self.passcodes.len(),
            devices: self.devices.len(),
            actions: self.actions.len(),
            audit_entries: self.audit.len(),
            alerts: self.alerts.len(),
            notifications: self.notifications.len(),
        }
    }
}

/// How many records of each kind a snapshot (or a database) holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotCounts {
    pub sites: usize,
    pub users: usize,
    pub passcodes: usize,
    pub devices: usize,
    pub actions: usize,
    pub audit_entries: usize,
    pub alerts: usize,
    pub notifications: usize,
}

impl SnapshotCounts {
    /// Each kind's name (as [`Display`](fmt::Display) spells it) and count.
    pub fn kinds(&self) -> [(&'static str, usize); 8] {
        [
            ("sites", self.sites),
            ("users", self.users),
            ("company passcodes", self.passcodes),
            ("devices", self.devices),
            ("actions", self.actions),
            ("audit entries", self.audit_entries),
            ("alerts", self.alerts),
            ("notifications", self.notifications),
        ]
    }

    /// The first kind whose count differs: its name, this count and `other`'s.
    pub fn first_difference(&self, other: &SnapshotCounts) -> Option<(&'static str, usize, usize)> {
        self.kinds()
            .into_iter()
            .zip(other.kinds())
            .find(|((_, mine), (_, theirs))| mine != theirs)
            .map(|((kind, mine), (_, theirs))| (kind, mine, theirs))
    }

    pub fn total(&self) -> usize {
        self.kinds().iter().map(|(_, n)| n).sum()
    }
}

/// One line: `2 sites, 5 users, 1 company passcodes, ...`.
impl fmt::Display for SnapshotCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, count)) in self.kinds().into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{count} {kind}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_one_per_kind_on_one_line_and_differences_are_named() {
        let counts = SnapshotCounts {
            sites: 2,
            users: 3,
            passcodes: 1,
            devices: 4,
            actions: 10,
            audit_entries: 5,
            alerts: 1,
            notifications: 6,
        };
        assert_eq!(
            counts.to_string(),
            "2 sites, 3 users, 1 company passcodes, 4 devices, 10 actions, \
             5 audit entries, 1 alerts, 6 notifications"
        );
        assert_eq!(counts.total(), 32);
        assert_eq!(counts.first_difference(&counts), None);
        let fewer = SnapshotCounts {
            audit_entries: 4,
            ..counts
        };
        assert_eq!(
            counts.first_difference(&fewer),
            Some(("audit entries", 5, 4))
        );
        assert_eq!(Snapshot::default().counts(), SnapshotCounts::default());
    }
}
