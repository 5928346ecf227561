//! The in-memory index of commands not final yet.

use super::*;

/// Commands not final yet, by device and by expiry. Kept in memory and
/// rebuilt from the action records when the database opens, so the records
/// are the only durable truth: a command costs no index writes of its own
/// (each sled write cost ~15 µs of CPU under fan-out load; BENCHMARKS.md).
#[derive(Debug, Default)]
pub(super) struct OpenCommands {
    /// device_id -> its open commands' ids; ids are time-ordered, so oldest first.
    pub(super) by_device: HashMap<String, BTreeSet<String>>,
    pub(super) by_expiry: BTreeSet<(Millis, String)>,
    /// What `OPEN_SINCE_KEY` holds, to write it only when it changes.
    pub(super) recorded_since: Option<String>,
}

impl OpenCommands {
    /// Follows a stored action: tracked while it is queued, dropped once final.
    pub(super) fn track(&mut self, action: &Action) {
        let id = &action.action_id;
        if action.is_queued() {
            if self
                .by_device
                .entry(action.device_id.clone())
                .or_default()
                .insert(id.clone())
            {
                self.by_expiry.insert((action.expires_at, id.clone()));
            }
        } else if let Some(ids) = self.by_device.get_mut(&action.device_id)
            && ids.remove(id)
        {
            if ids.is_empty() {
                self.by_device.remove(&action.device_id);
            }
            self.by_expiry.remove(&(action.expires_at, id.clone()));
        }
    }

    pub(super) fn oldest(&self) -> Option<&String> {
        self.by_device.values().filter_map(|ids| ids.first()).min()
    }
}
