//! Users, their per-site indexes and bulk imports (staged, then one commit point).

use super::*;

impl Storage {
    /// Inserts users of one site under the users lock, skipping (and
    /// returning the indexes of) those whose email the site already has,
    /// or an earlier user of the batch has.
    /// Refused, with nothing stored, when the site would pass `max_users`,
    /// and with an error when a new user's id is taken.
    /// Several users go in whole or not at all, also across a crash or a
    /// full disk: they are staged and flushed, then one key commits them
    /// (see `import_staged`).
    pub fn insert_users(
        &self,
        site_id: &str,
        users: &[User],
        max_users: usize,
    ) -> Result<UsersInserted, StorageError> {
        let _guard = hold(&self.users_lock);
        let mut existing = Vec::new();
        let mut new = Vec::new();
        let mut emails = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for (index, user) in users.iter().enumerate() {
            if !emails.insert(user.email.as_str())
                || self.users.contains_key(key2(site_id, &user.email))?
            {
                existing.push(index);
                continue;
            }
            if !ids.insert(user.user_id.as_str()) || self.get_user_by_id(&user.user_id)?.is_some() {
                return Err(StorageError::Refused(format!(
                    "user id {} is taken",
                    user.user_id
                )));
            }
            new.push(user);
        }
        let count = self.site_user_count(site_id)?;
        if count.saturating_add(new.len()) > max_users {
            return Ok(UsersInserted::OverQuota { users: count });
        }
        let written = match new.as_slice() {
            [] => Ok(()),
            // One record is its own commit point.
            [user] => self.write_user(user),
            _ => self.import_staged(site_id, &new),
        };
        let mut counts = self.user_counts();
        match written {
            Ok(()) => {
                counts.insert(site_id.to_owned(), count + new.len());
                Ok(UsersInserted::Inserted { existing })
            }
            Err(error) => {
                // Counted again from the records next time.
                counts.remove(site_id);
                Err(error)
            }
        }
    }

    pub(super) fn user_counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.user_counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The number of users of the site; callers hold the users lock.
    pub(super) fn site_user_count(&self, site_id: &str) -> Result<usize, StorageError> {
        if let Some(count) = self.user_counts().get(site_id) {
            return Ok(*count);
        }
        let mut count = 0;
        for key in self.users.scan_prefix(prefix(site_id)).keys() {
            key?;
            count += 1;
        }
        self.user_counts().insert(site_id.to_owned(), count);
        Ok(count)
    }

    /// Writes a user and its indexes: indexes first, the record is the commit point.
    pub(super) fn write_user(&self, user: &User) -> Result<(), StorageError> {
        let key = key2(&user.site_id, &user.email);
        self.user_ids
            .insert(user.user_id.as_bytes(), key.as_slice())?;
        self.user_sites
            .insert(key2(&user.email, &user.site_id), &[])?;
        self.users.insert(key, encode(user))?;
        Ok(())
    }

    /// Stores users all or none. Their rows are staged and flushed (a full
    /// disk fails here, before anything is visible), then the import's key
    /// is written and flushed: that is the commit point. The rows are then
    /// applied and the staging removed; `open` finishes an import committed
    /// before a crash and drops one that was not.
    pub(super) fn import_staged(&self, site_id: &str, users: &[&User]) -> Result<(), StorageError> {
        let import_id = mdm_core::model::time_ordered_id();
        let staged = self
            .stage_import(&import_id, users)
            .and_then(|()| self.flush());
        if let Err(error) = staged {
            self.discard_import(&import_id);
            return Err(error);
        }
        let committed = self
            .user_imports
            .insert(import_id.as_bytes(), site_id.as_bytes())
            .map_err(StorageError::from)
            .and_then(|_| self.flush());
        if let Err(error) = committed {
            // Whether the key reached the disk decides after a restart; the
            // import is then whole or absent either way.
            let _ = self.user_imports.remove(import_id.as_bytes());
            self.discard_import(&import_id);
            return Err(error);
        }
        self.apply_import(&import_id)
    }

    pub(super) fn stage_import(
        &self,
        import_id: &str,
        users: &[&User],
    ) -> Result<(), StorageError> {
        for (row, user) in users.iter().enumerate() {
            self.staged_users
                .insert(key2(import_id, &format!("{row:06}")), encode(user))?;
        }
        Ok(())
    }

    /// Applies a committed import's staged rows (again, after a crash: the
    /// writes are idempotent), then removes them and the import's key.
    pub(super) fn apply_import(&self, import_id: &str) -> Result<(), StorageError> {
        let rows = prefix(import_id);
        for entry in self.staged_users.scan_prefix(&rows) {
            let (_, value) = entry?;
            self.write_user(&decode(&value)?)?;
        }
        for key in self.staged_users.scan_prefix(&rows).keys() {
            self.staged_users.remove(key?)?;
        }
        self.user_imports.remove(import_id.as_bytes())?;
        Ok(())
    }

    /// Removes the staged rows of an import that did not commit.
    pub(super) fn discard_import(&self, import_id: &str) {
        let removed = self
            .staged_users
            .scan_prefix(prefix(import_id))
            .keys()
            .try_for_each(|key| self.staged_users.remove(key?).map(|_| ()));
        if let Err(error) = removed {
            // Dropped by the next start instead.
            tracing::warn!(%error, import_id, "cannot remove the staged rows of a failed import");
        }
    }

    /// Finishes the imports a crash interrupted after their commit point
    /// and drops the staged rows of those interrupted before it.
    pub(super) fn finish_user_imports(&self) -> Result<(), StorageError> {
        let _guard = hold(&self.users_lock);
        for entry in self.user_imports.iter() {
            let (import_id, site_id) = entry?;
            let import_id = String::from_utf8_lossy(&import_id).into_owned();
            tracing::warn!(import_id, site_id = %String::from_utf8_lossy(&site_id), "finishing a user import interrupted by a crash");
            self.apply_import(&import_id)?;
        }
        for key in self.staged_users.iter().keys() {
            self.staged_users.remove(key?)?;
        }
        Ok(())
    }

    pub fn get_user(&self, site_id: &str, email: &str) -> Result<Option<User>, StorageError> {
        self.users
            .get(key2(site_id, email))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn get_user_by_id(&self, user_id: &str) -> Result<Option<User>, StorageError> {
        let Some(key) = self.user_ids.get(user_id.as_bytes())? else {
            return Ok(None);
        };
        let user: Option<User> = self.users.get(key)?.map(|v| decode(&v)).transpose()?;
        Ok(user.filter(|u| u.user_id == user_id))
    }

    pub fn list_users(
        &self,
        site_id: &str,
        page_token: &str,
        limit: usize,
    ) -> Result<Page<User>, StorageError> {
        page(
            &self.users,
            b"users\0",
            &prefix(site_id),
            page_token,
            limit,
            false,
            |_, v| decode(v).map(Some),
        )
    }

    /// Removes a user; returns it, or None when there was none.
    pub fn delete_user(&self, user_id: &str) -> Result<Option<User>, StorageError> {
        let _guard = hold(&self.users_lock);
        let Some(key) = self.user_ids.get(user_id.as_bytes())? else {
            return Ok(None);
        };
        let Some(bytes) = self.users.get(&key)? else {
            self.user_ids.remove(user_id.as_bytes())?;
            return Ok(None);
        };
        let user: User = decode(&bytes)?;
        if user.user_id != user_id {
            // A dangling index entry of an earlier user with that email.
            self.user_ids.remove(user_id.as_bytes())?;
            return Ok(None);
        }
        // The record first: once it is gone the user is gone.
        self.users.remove(&key)?;
        if let Some(count) = self.user_counts().get_mut(&user.site_id) {
            *count = count.saturating_sub(1);
        }
        self.user_sites.remove(key2(&user.email, &user.site_id))?;
        self.user_ids.remove(user_id.as_bytes())?;
        Ok(Some(user))
    }

    /// Ids of the sites that have a user with this (lower-case) email.
    pub fn sites_of_email(&self, email: &str) -> Result<Vec<String>, StorageError> {
        let prefix = prefix(email);
        self.user_sites
            .scan_prefix(&prefix)
            .keys()
            .map(|key| {
                let key = key?;
                Ok(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            })
            .collect()
    }
}
