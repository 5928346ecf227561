//! Actions: commands queued, delivered, reported, expired, and the action log.

use super::*;

impl Storage {
    /// Stores an action (new or changed). The index entries that list it
    /// are written before the record, so a crash leaves at most an entry
    /// readers skip.
    pub fn put_action(&self, action: &Action) -> Result<(), StorageError> {
        self.device_actions
            .insert(key2(&action.device_id, &action.action_id), &[])?;
        self.put_changed_action(action)
    }

    /// [`put_action`](Self::put_action) for an action already stored: its
    /// index entries exist (ids never change).
    pub(super) fn put_changed_action(&self, action: &Action) -> Result<(), StorageError> {
        self.actions.insert(
            action_key(&action.site_id, &action.action_id)?,
            encode_action(action),
        )?;
        self.open_commands().track(action);
        Ok(())
    }

    pub(super) fn lock_device_actions(&self, device_id: &str) -> MutexGuard<'_, ()> {
        hold_stripe(&self.action_locks, device_id)
    }

    /// Changes an action under its device's actions lock; `change` returns
    /// false to leave it as it was. Returns the action after and whether it
    /// changed.
    pub fn update_action(
        &self,
        action_id: &str,
        change: impl FnOnce(&mut Action) -> bool,
    ) -> Result<Option<(Action, bool)>, StorageError> {
        // An action's device never changes: read it to know which lock to take.
        let Some(device_id) = self.get_action(action_id)?.map(|a| a.device_id) else {
            return Ok(None);
        };
        self.update_device_action(&device_id, action_id, change)
    }

    /// [`update_action`](Self::update_action) for a caller that knows the
    /// device: `change` runs only when the action is the device's.
    pub fn update_device_action(
        &self,
        device_id: &str,
        action_id: &str,
        change: impl FnOnce(&mut Action) -> bool,
    ) -> Result<Option<(Action, bool)>, StorageError> {
        let _guard = self.lock_device_actions(device_id);
        let Some(mut action) = self.get_action(action_id)? else {
            return Ok(None);
        };
        let changed = action.device_id == device_id && change(&mut action);
        if changed {
            self.put_changed_action(&action)?;
        }
        Ok(Some((action, changed)))
    }

    /// Queues a command under its device's actions lock. The action record
    /// is the commit point: the device's latest reset and the notifications
    /// are written before it (readers skip either when its action does not
    /// exist) and taken back when it cannot be written; superseded commands
    /// are marked after it, so a crash in between leaves an older command
    /// queued too, never a canceled one without the command that replaced it.
    /// A command for a device that is not stored, or with an email whose id
    /// is taken, is refused before anything is written.
    pub fn store_command(&self, command: NewCommand) -> Result<Queued, StorageError> {
        let NewCommand {
            mut action,
            online,
            notifications,
            latest_reset,
        } = command;
        let device_id = action.device_id.clone();
        let action_id = action.action_id.clone();
        let _guard = self.lock_device_actions(&device_id);
        if self.get_device(&device_id)?.is_none() {
            return Err(StorageError::Refused(format!(
                "a command for device {device_id}, which is not stored"
            )));
        }
        let mut ids = std::collections::HashSet::new();
        for notification in &notifications {
            let id = notification.notification_id.as_str();
            if !ids.insert(id) || self.outbox.contains_key(id.as_bytes())? {
                return Err(StorageError::Refused(format!(
                    "notification id {id} is taken"
                )));
            }
        }
        let mut previous = None;
        let mut reset_written = false;
        let written = (|| {
            if let Some(latest) = latest_reset {
                self.update_device(&device_id, |device| {
                    previous = device.security.latest_reset.replace(latest);
                    true
                })?;
                reset_written = true;
            }
            for notification in &notifications {
                self.put_notification(notification)?;
            }
            let queued = self.queued_actions(&device_id)?;
            let (superseded, direct) =
                mdm_core::rules::plan_queue(&mut action, queued, online, now_millis());
            self.put_action(&action)?;
            Ok((superseded, direct))
        })();
        let (mut superseded, direct) = match written {
            Ok(written) => written,
            Err(error) => {
                self.undo_command(
                    &device_id,
                    &action_id,
                    reset_written.then_some(previous),
                    &notifications,
                );
                return Err(error);
            }
        };
        // The command is stored from here on, so this call must not fail: an
        // older one that cannot be marked superseded stays queued instead.
        superseded.retain(|older| match self.put_action(older) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, action_id = %older.action_id, "cannot mark a superseded command");
                false
            }
        });
        Ok(Queued {
            action,
            superseded,
            direct,
        })
    }

    /// Takes back what a command wrote before its action could not be stored.
    pub(super) fn undo_command(
        &self,
        device_id: &str,
        action_id: &str,
        previous_reset: Option<Option<mdm_core::model::LatestReset>>,
        notifications: &[Notification],
    ) {
        for notification in notifications {
            if let Err(error) = self.remove_notification(&notification.notification_id) {
                tracing::error!(%error, "cannot remove the email of a command that failed");
            }
        }
        let Some(previous) = previous_reset else {
            return;
        };
        let restored = self.update_device(device_id, |device| {
            let ours = device
                .security
                .latest_reset
                .as_ref()
                .is_some_and(|r| r.action_id == action_id);
            if ours {
                device.security.latest_reset = previous;
            }
            ours
        });
        if let Err(error) = restored {
            tracing::error!(%error, device_id, "cannot restore the latest reset of a command that failed");
        }
    }

    /// The device's commands that are not final yet, oldest first.
    pub fn queued_actions(&self, device_id: &str) -> Result<Vec<Action>, StorageError> {
        let ids: Vec<String> = self
            .open_commands()
            .by_device
            .get(device_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        let mut actions = Vec::with_capacity(ids.len());
        for action_id in ids {
            if let Some(action) = self.get_action(&action_id)?
                && action.is_queued()
            {
                actions.push(action);
            }
        }
        Ok(actions)
    }

    /// Ids of commands not yet final whose expiry is at or before `now`
    /// (as [`mdm_core::rules::expire`] decides).
    pub fn expired_action_ids(&self, now: Millis) -> Vec<String> {
        let open = self.open_commands();
        let due: Box<dyn Iterator<Item = &(Millis, String)>> = match now.checked_add(1) {
            Some(after) => Box::new(open.by_expiry.range(..(after, String::new()))),
            None => Box::new(open.by_expiry.iter()),
        };
        due.map(|(_, id)| id.clone()).collect()
    }

    pub fn get_action(&self, action_id: &str) -> Result<Option<Action>, StorageError> {
        let Some(key) = key_from_id(action_id) else {
            return Ok(None);
        };
        let value = match self.actions.get(key)? {
            Some(value) => Some(value),
            None => match self.legacy_action_keys.get(action_id.as_bytes())? {
                Some(key) => self.actions.get(key)?,
                None => None,
            },
        };
        // uuid also parses other spellings of an id; only the exact one is it.
        Ok(value
            .map(|v| decode_action(&v))
            .transpose()?
            .filter(|action| action.action_id == action_id))
    }

    /// Schema 3 keys action records by site. Records made before keep their
    /// ids, so each also gets an entry in `legacy_action_keys` (written
    /// first: a crash leaves at most an entry the next start rewrites).
    pub(super) fn move_actions_to_site_keys(&self) -> Result<(), StorageError> {
        let mut moved = 0usize;
        for entry in self.legacy_actions.iter() {
            let (action_id, value) = entry?;
            let action = decode_action(&value)?;
            let key = action_key(&action.site_id, &action.action_id)?;
            self.legacy_action_keys.insert(&action_id, &key)?;
            self.actions.insert(key, value)?;
            moved += 1;
        }
        if moved > 0 {
            tracing::info!(moved, "action records keyed by site");
        }
        Ok(())
    }

    /// Actions of a site, or of one device when `device_id` is given,
    /// newest first, keeping those `keep` lets through.
    pub fn list_actions(
        &self,
        site_id: &str,
        device_id: Option<&str>,
        page_token: &str,
        limit: usize,
        keep: impl Fn(&Action) -> bool,
    ) -> Result<Page<Action>, StorageError> {
        let Some(device_id) = device_id else {
            // Another site may share the tag; its records are skipped.
            return page(
                &self.actions,
                b"actions\0",
                &site_tag(site_id),
                page_token,
                limit,
                true,
                |_, value| {
                    let action = decode_action(value)?;
                    Ok((action.site_id == site_id && keep(&action)).then_some(action))
                },
            );
        };
        let prefix = prefix(device_id);
        page(
            &self.device_actions,
            &key3("device actions", site_id, ""),
            &prefix,
            page_token,
            limit,
            true,
            |key, _| {
                let action_id = String::from_utf8_lossy(&key[prefix.len()..]);
                Ok(self
                    .get_action(&action_id)?
                    .filter(|a| a.site_id == site_id && keep(a)))
            },
        )
    }

    /// Whether any action of the device passes `wanted`, newest first, so a
    /// recent match answers after a few reads.
    pub fn device_has_action(
        &self,
        device_id: &str,
        wanted: impl Fn(&Action) -> bool,
    ) -> Result<bool, StorageError> {
        let prefix = prefix(device_id);
        for entry in self.device_actions.scan_prefix(&prefix).keys().rev() {
            let key = entry?;
            let action_id = String::from_utf8_lossy(&key[prefix.len()..]);
            if self
                .get_action(&action_id)?
                .is_some_and(|action| action.device_id == device_id && wanted(&action))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
