//! Everything the server keeps in sled: keys, encoding and the schema
//! version. The rest of the server sees operations on domain values only, so
//! another backend can take sled's place.
//!
//! We never use sled transactions or batches: in sled 0.34 either one
//! switches the whole process to a global reader-writer lock that deadlocks
//! against sled's own flusher under concurrent load (seen here in tests).
//! Instead, multi-key changes are serialised by our own locks and ordered so
//! that one key is the commit point: index entries are written before the
//! record they point to and removed after it, so a crash leaves at most a
//! dangling index entry, which every reader checks against the record. A
//! lockout is committed inside the passcode record itself
//! (`pending_lockout`) and copied to the alert log and outbox afterwards;
//! `open` finishes any copy a crash interrupted.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::{Arc, Mutex, MutexGuard};

use mdm_core::model::AuditEntry;
use mdm_core::model::{
    Action, Alert, CompanyPasscodeRecord, Device, DeviceStatus, Millis, Notification,
    NotificationState, PendingLockout, Site, User, now_millis,
};
use mdm_core::store::{Enrolled, FailedAttempt, NewCommand, Page, Queued, UsersInserted};

mod actions;
mod codec;
mod devices;
/// [`Storage::export`]: every record, for a move to another backend.
mod export;
mod group_commit;
mod open_commands;
mod outbox;
mod passcodes;
mod sites;
mod users;

pub use codec::new_action_id;
use codec::*;
use group_commit::GroupCommit;
use open_commands::OpenCommands;

/// Bumped whenever the layout of keys or values changes incompatibly.
/// 2: commands not final yet are found from the action records; the
/// `device_queue` and `action_expiry` trees of version 1 are emptied.
/// 3: action records keyed by site tag and id, postcard-encoded from then
/// on; the `actions` and `site_actions` trees of version 2 are emptied.
/// 4: the serial-number index lists every device enrolled with a serial
/// (`serial_devices`, built from the device records), so the check for an
/// active duplicate sees them all; version 3's `device_serials` (one device
/// per serial) is emptied.
pub const SCHEMA_VERSION: u32 = 4;
const SCHEMA_KEY: &[u8] = b"schema_version";
/// The oldest command that was not final at the last expiry sweep.
const OPEN_SINCE_KEY: &[u8] = b"open_commands_since";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("database files: {0}")]
    Files(#[from] std::io::Error),
    #[error("storage work stopped before it finished: {0}")]
    Stopped(String),
    #[error(
        "the database at {path} has schema version {found}, this server needs {expected}; refusing to start"
    )]
    SchemaMismatch {
        path: String,
        found: String,
        expected: u32,
    },
    #[error("no database at {0}")]
    Missing(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("page_token is not one this list returned")]
    BadPageToken,
    /// The operation would overwrite a record it must not (an id that is
    /// taken) or refers to one that is not there; nothing was stored.
    #[error("refused: {0}")]
    Refused(String),
    #[error(
        "the database at {0} is in use by another process; is another mdm-server running on this data dir?"
    )]
    Locked(String),
}

impl StorageError {
    /// Whether the disk under the database is full. (sled repeats the first
    /// I/O error of its log for every later write, keeping only its kind.)
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StorageError::Sled(sled::Error::Io(io)) | StorageError::Files(io) => io,
            _ => return false,
        };
        io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28)
    }
}

/// Removes `snap.*.generating` files from a sled directory; whether there were any.
fn remove_half_written_snapshots(path: &Path) -> Result<bool, StorageError> {
    let mut removed = false;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path())?;
            removed = true;
        }
    }
    Ok(removed)
}

/// The sled database and its trees.
#[derive(Debug, Clone)]
pub struct Storage {
    db: sled::Db,
    meta: sled::Tree,
    /// site_id -> Site
    sites: sled::Tree,
    /// site_id \0 email -> User
    users: sled::Tree,
    /// user_id -> site_id \0 email
    user_ids: sled::Tree,
    /// email \0 site_id -> () : which sites an email belongs to
    user_sites: sled::Tree,
    /// site_id -> CompanyPasscodeRecord
    passcodes: sled::Tree,
    /// HMAC of a current passcode -> site_id
    passcode_hashes: sled::Tree,
    /// site_id \0 alert_id -> Alert
    alerts: sled::Tree,
    /// notification_id -> Notification
    outbox: sled::Tree,
    /// device_id -> Device
    devices: sled::Tree,
    /// Device records as decoded, filled when read under the device's stripe
    /// lock and replaced by every write, under the same lock: each lock or
    /// reset reads its device, and a sled read with a JSON decode was about
    /// 6 % of the server's CPU in the lock fan-out (BENCHMARKS.md).
    device_cache: Arc<std::sync::RwLock<HashMap<String, Arc<Device>>>>,
    /// site_id \0 device_id -> ()
    site_devices: sled::Tree,
    /// site_id \0 serial number \0 device_id -> () for every device enrolled
    /// with a serial number (a device keeps the one it enrolled with);
    /// readers check the device record.
    serial_devices: sled::Tree,
    /// Schema 3's serial index (site_id \0 serial number -> the device
    /// enrolled last with it); emptied when opened.
    legacy_device_serials: sled::Tree,
    /// site tag (4 bytes) ++ action id (16 bytes, time-ordered) -> Action:
    /// a site's records sit together, newest last, so listing them needs no
    /// index. New ids end with their site's tag, so an id alone is its key.
    actions: sled::Tree,
    /// action id -> key in `actions`, for the ids made before schema 3.
    legacy_action_keys: sled::Tree,
    /// Schema 2's records (action_id -> Action) and their site index;
    /// moved to `actions` and emptied when opened.
    legacy_actions: sled::Tree,
    legacy_site_actions: sled::Tree,
    /// device_id \0 action_id -> ()
    device_actions: sled::Tree,
    /// Schema 1's indexes of commands not yet final; emptied when opened.
    legacy_queue: sled::Tree,
    legacy_expiry: sled::Tree,
    open: Arc<Mutex<OpenCommands>>,
    /// device_id \0 entry id (time-ordered) -> AuditEntry
    device_audit: sled::Tree,
    /// notification_id -> () for notifications still to deliver
    outbox_pending: sled::Tree,
    /// Serialises read-modify-write of one device's actions (all the
    /// changes that must see each other touch one device); a lock per stripe
    /// of devices, so that commands for different devices do not wait on
    /// each other (one lock for all cost the fan-out a tenth of its speed).
    action_locks: Arc<[Mutex<()>; LOCK_STRIPES]>,
    commit: Arc<GroupCommit>,
    /// Serialises enrollments: the serial-number index spans devices.
    devices_lock: Arc<Mutex<()>>,
    /// Serialises read-modify-write of one device record, by stripe;
    /// `enroll_device` also takes the stripe of a device it replaces.
    device_locks: Arc<[Mutex<()>; LOCK_STRIPES]>,
    /// Serialises changes to users and their indexes.
    users_lock: Arc<Mutex<()>>,
    /// How many users each site has, counted once per site on first need
    /// and kept in step under `users_lock`.
    user_counts: Arc<Mutex<HashMap<String, usize>>>,
    /// import id \0 row (6 digits) -> User: rows of an import not applied yet.
    staged_users: sled::Tree,
    /// import id -> site id: the commit point of an import whose rows are
    /// all staged; removed once they are applied.
    user_imports: sled::Tree,
    /// Serialises changes to company passcode records.
    passcode_lock: Arc<Mutex<()>>,
    /// Serialises read-modify-write of site records.
    sites_lock: Arc<Mutex<()>>,
    /// Sites that have a webhook, kept in step with `sites` by `put_site`:
    /// every action change asks, and most sites have none.
    webhook_sites: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
}

const LOCK_STRIPES: usize = 64;

/// The lock of `key`'s stripe.
fn hold_stripe<'a>(locks: &'a [Mutex<()>; LOCK_STRIPES], key: &str) -> MutexGuard<'a, ()> {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    hold(&locks[(hash % LOCK_STRIPES as u64) as usize])
}

fn hold(lock: &Mutex<()>) -> MutexGuard<'_, ()> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Storage {
    /// Creates a new database and records the schema version.
    pub fn create(path: &Path) -> Result<Self, StorageError> {
        let storage = Self::open_unchecked(path)?;
        storage
            .meta
            .insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes().as_slice())?;
        Ok(storage)
    }

    /// Opens an existing database, refusing one of another schema version.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if !path.is_dir() {
            return Err(StorageError::Missing(path.display().to_string()));
        }
        let storage = Self::open_unchecked(path)?;
        let found = storage.meta.get(SCHEMA_KEY)?;
        let version = found
            .as_deref()
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes);
        if !matches!(version, Some(1..=SCHEMA_VERSION)) {
            return Err(StorageError::SchemaMismatch {
                path: path.display().to_string(),
                found: version.map_or_else(|| "none".to_owned(), |v| v.to_string()),
                expected: SCHEMA_VERSION,
            });
        }
        let upgrading = version != Some(SCHEMA_VERSION);
        if upgrading {
            storage.move_actions_to_site_keys()?;
            storage.index_device_serials()?;
            storage.flush()?;
        }
        storage.load_open_commands()?;
        if upgrading {
            storage
                .meta
                .insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes().as_slice())?;
            storage.flush()?;
            tracing::info!("database upgraded to schema version {SCHEMA_VERSION}");
        }
        // Emptied only once the upgrade is recorded; after a crash in between,
        // the next start finishes it.
        for legacy in [
            &storage.legacy_queue,
            &storage.legacy_expiry,
            &storage.legacy_actions,
            &storage.legacy_site_actions,
            &storage.legacy_device_serials,
        ] {
            if !legacy.is_empty() {
                legacy.clear()?;
            }
        }
        storage.finish_pending_lockouts()?;
        storage.finish_user_imports()?;
        storage.load_webhook_sites()?;
        Ok(storage)
    }

    /// Finds the commands not final yet: every action created since the
    /// oldest one open at the last sweep, or within the longest a command can
    /// live, whichever is earlier (and those schema 1 indexed).
    fn load_open_commands(&self) -> Result<(), StorageError> {
        let horizon = first_id_at(now_millis().saturating_sub(open_command_horizon()));
        let recorded = self
            .meta
            .get(OPEN_SINCE_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let since = recorded.clone().map_or(horizon.clone(), |r| r.min(horizon));
        let mut open = OpenCommands {
            recorded_since: recorded,
            ..OpenCommands::default()
        };
        let since = uuid::Uuid::try_parse(&since).map_err(|_| {
            StorageError::Corrupt("meta/open_commands_since is not an action id".into())
        })?;
        // Each site's records since then: jump from one site tag to the next.
        let mut next_tag = Some(0u32);
        while let Some(from) = next_tag {
            let Some(first) = self.actions.range(from.to_be_bytes()..).keys().next() else {
                break;
            };
            let tag = tag_of_key(&first?)?;
            next_tag = tag.checked_add(1);
            let low = [tag.to_be_bytes().as_slice(), since.as_bytes()].concat();
            let records = match next_tag {
                Some(next) => self.actions.range(low..next.to_be_bytes().to_vec()),
                None => self.actions.range(low..),
            };
            for entry in records {
                let (_, value) = entry?;
                let action = decode_action(&value)?;
                if action.is_queued() {
                    open.track(&action);
                }
            }
        }
        for key in self.legacy_queue.iter().keys() {
            let key = key?;
            let Some(at) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            if let Some(action) = self.get_action(&String::from_utf8_lossy(&key[at + 1..]))?
                && action.is_queued()
            {
                open.track(&action);
            }
        }
        *self.open_commands() = open;
        Ok(())
    }

    fn open_commands(&self) -> MutexGuard<'_, OpenCommands> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records where the next start begins looking for open commands: the
    /// oldest one open now (or now, when none is). One write when it moved.
    pub fn record_open_commands_since(&self) -> Result<(), StorageError> {
        let since = {
            let mut open = self.open_commands();
            let since = open
                .oldest()
                .cloned()
                .unwrap_or_else(|| first_id_at(now_millis()));
            if open.recorded_since.as_ref() == Some(&since) {
                return Ok(());
            }
            open.recorded_since = Some(since.clone());
            since
        };
        self.meta.insert(OPEN_SINCE_KEY, since.as_bytes())?;
        Ok(())
    }

    fn load_webhook_sites(&self) -> Result<(), StorageError> {
        let mut sites = self
            .webhook_sites
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for entry in self.sites.iter() {
            let (_, value) = entry?;
            let site: Site = decode(&value)?;
            if site.webhook.is_some() {
                sites.insert(site.site_id);
            }
        }
        Ok(())
    }

    /// Whether the site has a webhook, without reading the site.
    pub fn site_has_webhook(&self, site_id: &str) -> bool {
        self.webhook_sites
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(site_id)
    }

    fn open_unchecked(path: &Path) -> Result<Self, StorageError> {
        // sled's background threads keep the file lock for a moment after
        // the last handle is dropped (after first-start creation, or a
        // restart in one process); a lock held longer is another process.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // sled creates its files with the umask's mode, also later (snapshots):
        // the directory, owner-only before sled opens it, is what protects them.
        mdm_core::fsutil::create_private_dir(path)?;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .flush_every_ms(Some(500))
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(error))
                    if error.to_string().contains("could not acquire lock") =>
                {
                    if std::time::Instant::now() >= deadline {
                        return Err(StorageError::Locked(path.display().to_string()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                // sled reads a snapshot it never finished writing (a full
                // disk, a kill) as the newest one and calls it corrupt. It
                // held the file lock when it said so: nobody else writes them.
                Err(sled::Error::Corruption { .. }) if remove_half_written_snapshots(path)? => {
                    tracing::warn!(path = %path.display(), "removed a snapshot sled had not finished writing");
                }
                Err(error) => return Err(error.into()),
            }
        };
        mdm_core::fsutil::make_private_tree(path)?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            sites: db.open_tree("sites")?,
            users: db.open_tree("users")?,
            user_ids: db.open_tree("user_ids")?,
            user_sites: db.open_tree("user_sites")?,
            passcodes: db.open_tree("passcodes")?,
            passcode_hashes: db.open_tree("passcode_hashes")?,
            alerts: db.open_tree("alerts")?,
            outbox: db.open_tree("outbox")?,
            devices: db.open_tree("devices")?,
            site_devices: db.open_tree("site_devices")?,
            serial_devices: db.open_tree("serial_devices")?,
            legacy_device_serials: db.open_tree("device_serials")?,
            actions: db.open_tree("site_action_records")?,
            legacy_action_keys: db.open_tree("legacy_action_keys")?,
            legacy_actions: db.open_tree("actions")?,
            legacy_site_actions: db.open_tree("site_actions")?,
            device_actions: db.open_tree("device_actions")?,
            legacy_queue: db.open_tree("device_queue")?,
            legacy_expiry: db.open_tree("action_expiry")?,
            open: Arc::default(),
            device_audit: db.open_tree("device_audit")?,
            outbox_pending: db.open_tree("outbox_pending")?,
            action_locks: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
            commit: Arc::default(),
            devices_lock: Arc::default(),
            device_locks: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
            device_cache: Arc::default(),
            users_lock: Arc::default(),
            user_counts: Arc::default(),
            staged_users: db.open_tree("staged_users")?,
            user_imports: db.open_tree("user_imports")?,
            passcode_lock: Arc::default(),
            sites_lock: Arc::default(),
            webhook_sites: Arc::default(),
            db,
        })
    }

    #[cfg(test)]
    fn set_schema_version_for_test(&self, version: u32) -> Result<(), StorageError> {
        self.meta
            .insert(SCHEMA_KEY, version.to_be_bytes().as_slice())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdm_core::model::PasscodeState;

    #[test]
    fn a_database_of_another_schema_version_is_refused() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        storage
            .set_schema_version_for_test(SCHEMA_VERSION + 1)
            .expect("write");
        storage.flush().expect("flush");
        drop(storage);
        let error = Storage::open(&path).expect_err("refused");
        let message = error.to_string();
        assert!(
            message.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{message}"
        );
        assert!(message.contains("refusing to start"), "{message}");
    }

    /// An id as made for `site_id`, at `at`.
    fn action_id_at(site_id: &str, at: Millis) -> String {
        let id = uuid::Builder::from_unix_timestamp_millis(
            u64::try_from(at).expect("after 1970"),
            &mdm_core::crypto::os_random(),
        )
        .into_uuid();
        with_site_tag(id, site_id)
    }

    /// An id as schema 2 made them: no site tag.
    fn schema_2_id_at(at: Millis) -> String {
        uuid::Builder::from_unix_timestamp_millis(
            u64::try_from(at).expect("after 1970"),
            &mdm_core::crypto::os_random(),
        )
        .into_uuid()
        .to_string()
    }

    /// Stores `action` as schema 2 did.
    fn put_schema_2_action(storage: &Storage, action: &Action) {
        storage
            .legacy_site_actions
            .insert(key2(&action.site_id, &action.action_id), &[])
            .expect("site index");
        storage
            .device_actions
            .insert(key2(&action.device_id, &action.action_id), &[])
            .expect("device index");
        storage
            .legacy_actions
            .insert(action.action_id.as_bytes(), encode(action))
            .expect("record");
    }

    /// A lock command for `device_id` of site `st_1`, created at
    /// `created_at`, open for a day.
    fn open_command(device_id: &str, created_at: Millis) -> Action {
        open_command_of(
            "st_1",
            device_id,
            action_id_at("st_1", created_at),
            created_at,
        )
    }

    fn open_command_of(
        site_id: &str,
        device_id: &str,
        action_id: String,
        created_at: Millis,
    ) -> Action {
        use mdm_core::model::{ActionStatus, ActionType, CommandPayload};
        let expires_at = created_at + 86_400_000;
        let mut device = test_device(device_id, "S1");
        device.site_id = site_id.into();
        let mut action = Action::pending(
            action_id,
            &device,
            ActionType::Lock,
            "admin@example.com",
            "queued",
            created_at,
        );
        action.expires_at = expires_at;
        action.payload = Some(CommandPayload::Lock {
            message: String::new(),
        });
        assert_eq!(action.status, ActionStatus::Pending);
        action
    }

    fn ids(actions: Vec<Action>) -> Vec<String> {
        actions.into_iter().map(|a| a.action_id).collect()
    }

    #[test]
    fn commands_not_final_are_found_again_when_the_database_reopens() {
        use mdm_core::model::ActionStatus;
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let now = now_millis();
        let storage = Storage::create(&path).expect("create");
        let waiting = open_command("dv_1", now - 1000);
        let done = open_command("dv_1", now - 500);
        storage.put_action(&waiting).expect("put");
        storage.put_action(&done).expect("put");
        storage
            .update_action(&done.action_id, |a| {
                a.advance(ActionStatus::Succeeded, "locked", now)
            })
            .expect("update");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("reopen");
        assert_eq!(
            ids(storage.queued_actions("dv_1").expect("queue")),
            vec![waiting.action_id.clone()]
        );
        assert!(storage.expired_action_ids(now).is_empty());
        assert_eq!(
            storage.expired_action_ids(waiting.expires_at + 1),
            vec![waiting.action_id]
        );
    }

    #[test]
    fn a_command_older_than_any_command_can_live_is_found_through_the_last_sweep_record() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        // Created before the horizon (as after the clock jumped forward).
        let long_ago = now_millis() - open_command_horizon() - 86_400_000;
        let storage = Storage::create(&path).expect("create");
        let stranded = open_command("dv_2", long_ago);
        storage.put_action(&stranded).expect("put");
        storage.record_open_commands_since().expect("record");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("reopen");
        assert_eq!(
            ids(storage.queued_actions("dv_2").expect("queue")),
            vec![stranded.action_id.clone()]
        );
        // Once it is final, the record moves on and a restart does not look that far back.
        storage
            .update_action(&stranded.action_id, |a| {
                a.advance(
                    mdm_core::model::ActionStatus::Expired,
                    "expired",
                    now_millis(),
                )
            })
            .expect("update");
        storage.record_open_commands_since().expect("record");
        let since = storage
            .meta
            .get(OPEN_SINCE_KEY)
            .expect("read")
            .expect("recorded");
        assert!(since.as_ref() > stranded.action_id.as_bytes());
    }

    #[test]
    fn a_schema_1_database_is_upgraded_and_keeps_its_queued_commands() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        let long_ago = now_millis() - open_command_horizon() - 86_400_000;
        let queued = open_command_of("st_1", "dv_3", schema_2_id_at(long_ago), long_ago);
        put_schema_2_action(&storage, &queued);
        // Schema 1 kept its own queue and expiry indexes.
        storage
            .legacy_queue
            .insert(key2("dv_3", &queued.action_id), &[])
            .expect("legacy queue");
        let mut expiry = queued.expires_at.to_be_bytes().to_vec();
        expiry.extend_from_slice(queued.action_id.as_bytes());
        storage
            .legacy_expiry
            .insert(expiry, &[])
            .expect("legacy expiry");
        storage.set_schema_version_for_test(1).expect("version");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("upgraded");
        assert_eq!(
            ids(storage.queued_actions("dv_3").expect("queue")),
            vec![queued.action_id]
        );
        assert!(storage.legacy_queue.is_empty() && storage.legacy_expiry.is_empty());
        assert!(storage.legacy_actions.is_empty() && storage.legacy_site_actions.is_empty());
        drop(storage);
        let storage = Storage::open(&path).expect("reopen");
        let version = storage
            .meta
            .get(SCHEMA_KEY)
            .expect("read")
            .expect("version");
        assert_eq!(version.as_ref(), SCHEMA_VERSION.to_be_bytes().as_slice());
    }

    #[test]
    fn a_schema_2_action_log_is_keyed_by_site_and_every_old_id_still_finds_its_record() {
        use mdm_core::model::ActionStatus;
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let now = now_millis();
        let storage = Storage::create(&path).expect("create");
        let old: Vec<Action> = (0..3)
            .map(|i| {
                open_command_of(
                    "st_a",
                    "dv_a",
                    schema_2_id_at(now - 3000 + i),
                    now - 3000 + i,
                )
            })
            .collect();
        let other_site = open_command_of("st_b", "dv_b", schema_2_id_at(now - 2000), now - 2000);
        for action in old.iter().chain([&other_site]) {
            put_schema_2_action(&storage, action);
        }
        storage.set_schema_version_for_test(2).expect("version");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("upgraded");
        assert!(storage.legacy_actions.is_empty() && storage.legacy_site_actions.is_empty());
        for action in old.iter().chain([&other_site]) {
            assert_eq!(
                storage.get_action(&action.action_id).expect("get").as_ref(),
                Some(action)
            );
        }
        // Other spellings of an id are not that id.
        let upper = old[0].action_id.to_uppercase();
        assert_eq!(storage.get_action(&upper).expect("get"), None);
        assert_eq!(storage.get_action("not-an-id").expect("get"), None);
        // Still open, and changed where they are.
        assert_eq!(ids(storage.queued_actions("dv_a").expect("queue")).len(), 3);
        storage
            .update_action(&old[0].action_id, |a| {
                a.advance(ActionStatus::Succeeded, "locked", now)
            })
            .expect("update");
        let newer = open_command_of("st_a", "dv_a", new_action_id("st_a"), now);
        storage.put_action(&newer).expect("put");

        // One site's log, newest first, across the upgrade, in pages.
        let everything = |_: &Action| true;
        let first = storage
            .list_actions("st_a", None, "", 2, everything)
            .expect("list");
        let rest = storage
            .list_actions("st_a", None, &first.next_page_token, 10, everything)
            .expect("list");
        assert!(rest.next_page_token.is_empty());
        let listed: Vec<String> = ids(first.items.into_iter().chain(rest.items).collect());
        let expected: Vec<String> = [&newer, &old[2], &old[1], &old[0]]
            .iter()
            .map(|a| a.action_id.clone())
            .collect();
        assert_eq!(listed, expected);
        let by_device = storage
            .list_actions("st_a", Some("dv_a"), "", 10, everything)
            .expect("list");
        assert_eq!(ids(by_device.items), expected);
        let succeeded = storage
            .list_actions("st_a", None, "", 10, |a| {
                a.status == ActionStatus::Succeeded
            })
            .expect("list");
        assert_eq!(ids(succeeded.items), vec![old[0].action_id.clone()]);
        assert_eq!(
            ids(storage
                .list_actions("st_b", None, "", 10, everything)
                .expect("list")
                .items),
            vec![other_site.action_id.clone()]
        );
        drop(storage);

        // The upgrade is done once; a restart finds the same.
        let storage = Storage::open(&path).expect("reopen");
        assert_eq!(ids(storage.queued_actions("dv_a").expect("queue")).len(), 3);
        assert_eq!(
            storage
                .get_action(&old[0].action_id)
                .expect("get")
                .map(|a| a.status),
            Some(ActionStatus::Succeeded)
        );
    }

    #[test]
    fn a_schema_3_database_indexes_every_device_of_a_serial_number() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        let mut first = test_device("dv_1", "S7");
        let mut second = test_device("dv_2", "S7");
        let mut blank = test_device("dv_3", "");
        storage.enroll_device(&mut first, None).expect("enroll");
        storage.enroll_device(&mut second, None).expect("enroll");
        storage.enroll_device(&mut blank, None).expect("enroll");
        // Schema 3 kept one device per serial: the one enrolled last.
        storage.serial_devices.clear().expect("clear");
        storage
            .legacy_device_serials
            .insert(key2("st_1", "S7"), b"dv_2".as_slice())
            .expect("legacy index");
        storage.set_schema_version_for_test(3).expect("version");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("upgraded");
        assert!(storage.legacy_device_serials.is_empty());
        assert_eq!(storage.serial_devices.len(), 2);
        storage
            .update_device("dv_2", |d| {
                d.status = DeviceStatus::Unenrolled;
                true
            })
            .expect("unenroll");
        let mut third = test_device("dv_4", "S7");
        assert_eq!(
            storage.enroll_device(&mut third, None).expect("enroll"),
            Enrolled::AlongsideSameSerial("dv_1".into())
        );
        drop(storage);
        let storage = Storage::open(&path).expect("reopen");
        let version = storage
            .meta
            .get(SCHEMA_KEY)
            .expect("read")
            .expect("version");
        assert_eq!(version.as_ref(), SCHEMA_VERSION.to_be_bytes().as_slice());
        assert_eq!(storage.serial_devices.len(), 3);
    }

    #[test]
    fn a_device_read_after_a_change_is_the_changed_one_and_survives_a_reopen() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        let mut first = test_device("dv_1", "S9");
        storage.enroll_device(&mut first, None).expect("enroll");
        assert_eq!(
            storage.get_device("dv_1").expect("get").as_deref(),
            Some(&first)
        );
        storage
            .update_device("dv_1", |d| {
                d.user_email = "b@example.com".into();
                true
            })
            .expect("update");
        assert_eq!(
            storage
                .get_device("dv_1")
                .expect("get")
                .map(|d| d.user_email.clone()),
            Some("b@example.com".into())
        );
        // A serial number alone replaces nothing.
        let mut claimant = test_device("dv_3", "S9");
        assert_eq!(
            storage.enroll_device(&mut claimant, None).expect("enroll"),
            Enrolled::AlongsideSameSerial("dv_1".into())
        );
        assert_eq!(
            storage.get_device("dv_1").expect("get").map(|d| d.status),
            Some(DeviceStatus::Active)
        );
        // The same device, proven, enrolling again replaces the cached record too.
        let mut second = test_device("dv_2", "S9");
        assert_eq!(
            storage
                .enroll_device(&mut second, Some("dv_1"))
                .expect("enroll"),
            Enrolled::Replacing("dv_1".into())
        );
        let replaced = storage.get_device("dv_1").expect("get").expect("kept");
        assert_eq!(replaced.status, DeviceStatus::Replaced);
        assert_eq!(replaced.replaced_by_device_id.as_deref(), Some("dv_2"));
        storage.flush().expect("flush");
        drop(storage);
        let storage = Storage::open(&path).expect("reopen");
        assert_eq!(storage.get_device("dv_1").expect("get"), Some(replaced));
        assert_eq!(storage.get_device("dv_9").expect("get"), None);
    }

    fn test_device(device_id: &str, serial: &str) -> Device {
        serde_json::from_value(serde_json::json!({
            "device_id": device_id, "site_id": "st_1", "user_email": "a@example.com",
            "facts": {"platform": "Linux", "os_version": "", "model": "", "serial_number": serial,
                      "hostname": "", "agent_version": "", "capabilities": []},
            "status": "Active", "enrolled_at": 0, "last_seen": null, "certificates": [],
            "replaces_device_id": null, "replaced_by_device_id": null
        }))
        .expect("device")
    }

    /// Pins layout 1: if this fails, `Action` changed, and records already
    /// stored need a new layout byte (see `ACTION_LAYOUT_1`).
    #[test]
    fn an_action_record_in_layout_1_still_decodes() {
        use mdm_core::model::{ActionStatus, FailureCode};
        let mut action = open_command_of(
            "st_1",
            "dv_1",
            "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6".into(),
            1_700_000_000_000,
        );
        action.advance(
            ActionStatus::Failed,
            "no passcode support",
            1_700_000_000_500,
        );
        action.failure_reason = "no passcode support".into();
        action.failure_code = Some(FailureCode::Unsupported);
        let stored = LAYOUT_1_FIXTURE;
        assert_eq!(
            decode_action(&hex::decode(stored).expect("hex")).expect("decodes"),
            action
        );
        assert_eq!(hex::encode(encode_action(&action)), stored);
        // Older records are JSON, and still read.
        assert_eq!(decode_action(&encode(&action)).expect("json"), action);
        assert!(decode_action(&[9, 9]).is_err());
    }

    const LAYOUT_1_FIXTURE: &str = concat!(
        "012430313932663361342d356236632d376438652d396661302d6231633264336534663561360473",
        "745f310464765f3101051161646d696e406578616d706c652e636f6d80a0abfef962e8a7abfef962",
        "020080a0abfef9620671756575656405e8a7abfef962136e6f2070617373636f646520737570706f",
        "7274136e6f2070617373636f646520737570706f727401008090ded0fa62010000",
    );

    #[test]
    fn a_lockout_interrupted_by_a_crash_is_finished_on_open() {
        use mdm_core::model::{AlertKind, CompanyPasscodeRecord, PendingLockout};
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        let alert = Alert {
            alert_id: "a1".into(),
            site_id: "st_1".into(),
            kind: AlertKind::CompanyPasscodeLockedOut,
            created_at: 1,
            details: "locked".into(),
            failed_attempts: 3,
            source_addresses: vec!["127.0.0.1".into()],
        };
        let notification = Notification {
            notification_id: "n1".into(),
            site_id: "st_1".into(),
            channel: "email".into(),
            recipient: "owner@localhost".into(),
            subject: "s".into(),
            body_text: "b".into(),
            passcode_of_action: None,
            passcode_at: None,
            state: NotificationState::Pending,
            attempts: 0,
            last_error: String::new(),
            created_at: 1,
            next_attempt_at: 1,
            delivered_at: None,
        };
        let record = CompanyPasscodeRecord {
            site_id: "st_1".into(),
            state: PasscodeState::LockedOut,
            hash: "00".into(),
            generated_at: 0,
            generated_by: "owner@localhost".into(),
            failed_attempts: 3,
            last_failed_at: Some(1),
            last_used_at: None,
            enrollments: 0,
            failed_sources: vec!["127.0.0.1".into()],
            pending_lockout: Some(PendingLockout {
                alert: alert.clone(),
                notifications: vec![notification.clone()],
            }),
        };
        // What a crash right after the commit point leaves behind.
        storage
            .passcodes
            .insert(b"st_1", encode(&record))
            .expect("insert");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("open");
        assert_eq!(
            storage.list_alerts("st_1", "", 10).expect("alerts").items,
            vec![alert]
        );
        let outbox = storage
            .list_notifications(None, None, "", 10)
            .expect("outbox");
        assert_eq!(outbox.items, vec![notification]);
        let after = storage.get_passcode("st_1").expect("get").expect("record");
        assert!(after.pending_lockout.is_none());
        assert_eq!(after.state, PasscodeState::LockedOut);
    }

    #[test]
    fn the_successor_of_a_prefix_carries_past_0xff_bytes() {
        assert_eq!(prefix_successor(&[1, 2, 3, 4]), Some(vec![1, 2, 3, 5]));
        assert_eq!(prefix_successor(&[1, 2, 3, 0xFF]), Some(vec![1, 2, 4]));
        assert_eq!(prefix_successor(&[1, 0xFF, 0xFF, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xFF; 4]), None);
        assert_eq!(prefix_successor(&[]), None);
    }

    /// Every record under `tag` and none of its neighbours', in both
    /// directions and across pages, for tags ending in 0xFF bytes.
    #[test]
    fn a_page_under_a_prefix_ending_in_0xff_lists_exactly_that_prefix() {
        let temp = tempfile::tempdir().expect("temp dir");
        let storage = Storage::create(&temp.path().join("db")).expect("create");
        let tags: [[u8; 4]; 6] = [
            [0xFF; 4],
            [0xFF, 0xFF, 0xFF, 0xFE],
            [0x12, 0x34, 0x56, 0xFF],
            [0x12, 0x34, 0x56, 0xFE],
            [0x12, 0x34, 0x57, 0x00],
            [0x12, 0xFF, 0xFF, 0xFF],
        ];
        for tag in tags {
            for i in 0..3u8 {
                let mut key = tag.to_vec();
                key.extend_from_slice(&[0; 15]);
                key.push(i);
                storage.actions.insert(key, &[i]).expect("insert");
            }
        }
        // One key just past the carry of [0x12, 0xFF, 0xFF, 0xFF].
        storage.actions.insert([0x13], &[9]).expect("insert");
        let listed = |tag: &[u8], newest_first: bool| {
            let mut values = Vec::new();
            let mut token = String::new();
            loop {
                let page = page(
                    &storage.actions,
                    b"test\0",
                    tag,
                    &token,
                    2,
                    newest_first,
                    |_, v| Ok(Some(v.to_vec())),
                )
                .expect("page");
                values.extend(page.items);
                if page.next_page_token.is_empty() {
                    return values;
                }
                token = page.next_page_token;
            }
        };
        for tag in tags {
            assert_eq!(
                listed(&tag, true),
                vec![vec![2], vec![1], vec![0]],
                "{tag:x?}"
            );
            assert_eq!(
                listed(&tag, false),
                vec![vec![0], vec![1], vec![2]],
                "{tag:x?}"
            );
        }
    }

    /// A site id whose tag ends in 0xFF (about one in 256 does).
    fn site_id_with_tag_ending_in_0xff() -> String {
        (0..100_000)
            .map(|i| format!("st_ff{i}"))
            .find(|id| site_tag(id)[3] == 0xFF)
            .expect("one in 256 site ids")
    }

    #[test]
    fn the_action_log_of_a_site_whose_tag_ends_in_0xff_lists_its_actions() {
        let temp = tempfile::tempdir().expect("temp dir");
        let storage = Storage::create(&temp.path().join("db")).expect("create");
        let site = site_id_with_tag_ending_in_0xff();
        let now = now_millis();
        let mine: Vec<Action> = (0..3)
            .map(|i| open_command_of(&site, "dv_ff", action_id_at(&site, now + i), now + i))
            .collect();
        let other = open_command_of("st_other", "dv_o", action_id_at("st_other", now), now);
        for action in mine.iter().chain([&other]) {
            storage.put_action(action).expect("put");
        }
        let listed = storage
            .list_actions(&site, None, "", 10, |_| true)
            .expect("list");
        let expected: Vec<String> = mine.iter().rev().map(|a| a.action_id.clone()).collect();
        assert_eq!(ids(listed.items), expected);
        let first = storage
            .list_actions(&site, None, "", 2, |_| true)
            .expect("list");
        let rest = storage
            .list_actions(&site, None, &first.next_page_token, 2, |_| true)
            .expect("list");
        assert_eq!(
            ids(first.items.into_iter().chain(rest.items).collect()),
            expected
        );
    }

    fn test_user(site_id: &str, i: usize) -> User {
        User {
            user_id: format!("us_{site_id}_{i}"),
            site_id: site_id.into(),
            email: format!("u{i}@example.com"),
            display_name: String::new(),
            created_at: 0,
        }
    }

    fn emails(storage: &Storage, site_id: &str) -> Vec<String> {
        let page = storage.list_users(site_id, "", 1000).expect("list");
        page.items.into_iter().map(|u| u.email).collect()
    }

    #[test]
    fn an_import_interrupted_before_its_commit_point_stores_no_user() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        let users: Vec<User> = (0..5).map(|i| test_user("st_1", i)).collect();
        // What a crash (or a full disk) during staging leaves: rows, no commit.
        storage
            .stage_import("imp_1", &users.iter().collect::<Vec<_>>())
            .expect("stage");
        assert!(
            emails(&storage, "st_1").is_empty(),
            "staged rows are not users"
        );
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("reopen");
        assert!(emails(&storage, "st_1").is_empty());
        assert!(storage.staged_users.is_empty() && storage.user_imports.is_empty());
        assert_eq!(storage.get_user_by_id("us_st_1_0").expect("get"), None);
        // And the site can take the same users afterwards.
        assert_eq!(
            storage.insert_users("st_1", &users, 10).expect("insert"),
            UsersInserted::Inserted { existing: vec![] }
        );
        assert_eq!(emails(&storage, "st_1").len(), 5);
    }

    #[test]
    fn an_import_interrupted_after_its_commit_point_is_finished_on_open() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        let users: Vec<User> = (0..5).map(|i| test_user("st_1", i)).collect();
        storage
            .stage_import("imp_2", &users.iter().collect::<Vec<_>>())
            .expect("stage");
        storage
            .user_imports
            .insert(b"imp_2", b"st_1".as_slice())
            .expect("commit");
        // Crashed after applying the first row.
        storage.write_user(&users[0]).expect("apply one");
        storage.flush().expect("flush");
        drop(storage);

        let storage = Storage::open(&path).expect("reopen");
        assert_eq!(emails(&storage, "st_1").len(), 5);
        for user in &users {
            assert_eq!(
                storage.get_user_by_id(&user.user_id).expect("get").as_ref(),
                Some(user)
            );
            assert_eq!(
                storage.sites_of_email(&user.email).expect("sites"),
                vec!["st_1".to_owned()]
            );
        }
        assert!(storage.staged_users.is_empty() && storage.user_imports.is_empty());
    }

    #[test]
    fn users_over_the_site_limit_are_refused_whole() {
        let temp = tempfile::tempdir().expect("temp dir");
        let storage = Storage::create(&temp.path().join("db")).expect("create");
        let users: Vec<User> = (0..6).map(|i| test_user("st_1", i)).collect();
        assert_eq!(
            storage.insert_users("st_1", &users, 5).expect("insert"),
            UsersInserted::OverQuota { users: 0 }
        );
        assert!(emails(&storage, "st_1").is_empty());
        assert!(storage.staged_users.is_empty() && storage.user_imports.is_empty());
        assert_eq!(
            storage
                .insert_users("st_1", &users[..4], 5)
                .expect("insert"),
            UsersInserted::Inserted { existing: vec![] }
        );
        // Emails the site has already do not count twice.
        assert_eq!(
            storage
                .insert_users("st_1", &users[3..5], 5)
                .expect("insert"),
            UsersInserted::Inserted { existing: vec![0] }
        );
        assert_eq!(
            storage
                .insert_users("st_1", &users[5..], 5)
                .expect("insert"),
            UsersInserted::OverQuota { users: 5 }
        );
        // Another site has its own count; a deletion makes room.
        assert!(matches!(
            storage.insert_users("st_2", &[test_user("st_2", 0)], 5),
            Ok(UsersInserted::Inserted { .. })
        ));
        storage.delete_user("us_st_1_0").expect("delete");
        assert_eq!(
            storage
                .insert_users("st_1", &users[5..], 5)
                .expect("insert"),
            UsersInserted::Inserted { existing: vec![] }
        );
        assert_eq!(emails(&storage, "st_1").len(), 5);
    }

    /// A snapshot sled was writing when the disk filled up (or the process
    /// died) is left as `snap.<lsn>.generating`, which sled 0.34 would read
    /// as the newest snapshot and refuse as corrupt.
    #[test]
    fn a_half_written_snapshot_does_not_stop_the_database_from_opening() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        storage
            .put_site(&mdm_core::model::Site {
                site_id: "st_1".into(),
                display_name: "One".into(),
                failed_attempt_limit: 5,
                created_at: 0,
                reset_passcode_visible_days: 0,
                passcode_policy: Default::default(),
                webhook: None,
            })
            .expect("put");
        storage.flush().expect("flush");
        drop(storage);
        let half = path.join("snap.7FFFFFFFFFFFFFFF.generating");
        std::fs::write(&half, [0xA5; 100]).expect("write");

        let storage = Storage::open(&path).expect("opens");
        assert!(storage.get_site("st_1").expect("get").is_some());
        assert!(!half.exists());
    }

    #[test]
    fn a_missing_database_is_not_created_by_open() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        assert!(matches!(
            Storage::open(&path),
            Err(StorageError::Missing(_))
        ));
        assert!(!path.exists());
    }
}
