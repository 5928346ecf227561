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

use crate::model::AuditEntry;
use crate::model::{
    Action, Alert, CompanyPasscodeRecord, Device, DeviceStatus, Millis, Notification,
    NotificationState, PendingLockout, Site, User, now_millis,
};
use mdm_core::store::{Enrolled, FailedAttempt, NewCommand, Page, Queued, UsersInserted};

/// [`Storage::export`]: every record, for a move to another backend.
mod export;

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

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("domain records always serialize")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(e.to_string()))
}

/// First byte of an action record in postcard, layout 1. Action records
/// are written twice per command and carry its timeline: postcard makes
/// them about a third the size of JSON, and sled's cost grows with the
/// bytes it copies and logs. postcard is not self-describing, so a change
/// to `Action` (or what it holds) needs a new layout byte, reading the old
/// one into the new type; `an_action_record_in_layout_1_still_decodes`
/// fails first. Records older than the byte are JSON (they start with `{`).
const ACTION_LAYOUT_1: u8 = 1;

fn encode_action(action: &Action) -> Vec<u8> {
    postcard::to_extend(action, vec![ACTION_LAYOUT_1]).expect("domain records always serialize")
}

fn decode_action(bytes: &[u8]) -> Result<Action, StorageError> {
    match bytes.split_first() {
        Some((&ACTION_LAYOUT_1, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StorageError::Corrupt(e.to_string()))
        }
        Some((b'{', _)) => decode(bytes),
        _ => Err(StorageError::Corrupt(
            "an action record of an unknown layout".into(),
        )),
    }
}

/// Commands not final yet, by device and by expiry. Kept in memory and
/// rebuilt from the action records when the database opens, so the records
/// are the only durable truth: a command costs no index writes of its own
/// (each sled write cost ~15 µs of CPU under fan-out load; BENCHMARKS.md).
#[derive(Debug, Default)]
struct OpenCommands {
    /// device_id -> its open commands' ids; ids are time-ordered, so oldest first.
    by_device: HashMap<String, BTreeSet<String>>,
    by_expiry: BTreeSet<(Millis, String)>,
    /// What `OPEN_SINCE_KEY` holds, to write it only when it changes.
    recorded_since: Option<String>,
}

impl OpenCommands {
    /// Follows a stored action: tracked while it is queued, dropped once final.
    fn track(&mut self, action: &Action) {
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

    fn oldest(&self) -> Option<&String> {
        self.by_device.values().filter_map(|ids| ids.first()).min()
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

/// The smallest time-ordered id (UUID v7) of `at`: ids of later records sort after it.
fn first_id_at(at: Millis) -> String {
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(at).unwrap_or(0), &[0; 10])
        .into_uuid()
        .to_string()
}

/// Four bytes of a site id's SHA-256: the first bytes of the keys of the
/// site's action records, and the last bytes of the ids made for them.
fn site_tag(site_id: &str) -> [u8; 4] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(site_id.as_bytes());
    [digest[0], digest[1], digest[2], digest[3]]
}

fn with_site_tag(id: uuid::Uuid, site_id: &str) -> String {
    let mut bytes = id.into_bytes();
    bytes[12..].copy_from_slice(&site_tag(site_id));
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// A new action id for a record of `site_id`: a UUID v7 (time-ordered,
/// unique within the process by uuid's counter) that ends with the site's
/// tag, so the id alone locates the record.
pub fn new_action_id(site_id: &str) -> String {
    with_site_tag(uuid::Uuid::now_v7(), site_id)
}

/// Key of the record of `action_id` of `site_id`.
fn action_key(site_id: &str, action_id: &str) -> Result<[u8; 20], StorageError> {
    let id = uuid::Uuid::try_parse(action_id)
        .map_err(|_| StorageError::Corrupt(format!("action id {action_id:?} is not a UUID")))?;
    Ok(record_key(site_tag(site_id), &id))
}

/// Where a record made since schema 3 is, read from its id alone.
fn key_from_id(action_id: &str) -> Option<[u8; 20]> {
    let id = uuid::Uuid::try_parse(action_id).ok()?;
    let tag = <[u8; 4]>::try_from(&id.as_bytes()[12..]).ok()?;
    Some(record_key(tag, &id))
}

fn record_key(tag: [u8; 4], id: &uuid::Uuid) -> [u8; 20] {
    let mut key = [0; 20];
    key[..4].copy_from_slice(&tag);
    key[4..].copy_from_slice(id.as_bytes());
    key
}

fn tag_of_key(key: &[u8]) -> Result<u32, StorageError> {
    key.get(..4)
        .and_then(|tag| <[u8; 4]>::try_from(tag).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StorageError::Corrupt("an action key is too short".into()))
}

/// How far back an open command can have been created: its longest life,
/// and a day for clock adjustments.
fn open_command_horizon() -> Millis {
    let longest = crate::model::MAX_COMMAND_TTL + std::time::Duration::from_secs(86_400);
    Millis::try_from(longest.as_millis()).unwrap_or(Millis::MAX)
}

/// `a \0 b`: composite keys sort by `a`, then `b`.
fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + b.len() + 1);
    key.extend_from_slice(a.as_bytes());
    key.push(0);
    key.extend_from_slice(b.as_bytes());
    key
}

fn prefix(a: &str) -> Vec<u8> {
    key2(a, "")
}

/// `a \0 b \0 c`.
fn key3(a: &str, b: &str, c: &str) -> Vec<u8> {
    let mut key = key2(a, b);
    key.push(0);
    key.extend_from_slice(c.as_bytes());
    key
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

/// Under concurrent load, rounds of the group commit start at least this
/// far apart, so that each flush covers many callers: every flush costs a
/// log write and a `sync_file_range` on sled's threads, and at thousands of
/// commits a second those dominated the server's CPU (BENCHMARKS.md). A
/// caller working alone is never held back.
const MIN_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// Group commit: callers take tickets, one flusher serves them in rounds.
#[derive(Debug)]
struct GroupCommit {
    state: Mutex<CommitState>,
    /// (highest ticket flushed, highest ticket whose flush failed)
    /// Flushed up to this ticket; the last failed round's ticket, and
    /// whether it failed for a full disk.
    done: tokio::sync::watch::Sender<(u64, Option<(u64, bool)>)>,
}

#[derive(Debug, Default)]
struct CommitState {
    requested: u64,
    flushing: bool,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            done: tokio::sync::watch::channel((0, None)).0,
        }
    }
}

impl GroupCommit {
    fn flush_loop(&self, db: &sled::Db) {
        // When the last round served several callers, more are coming.
        let mut busy_since: Option<std::time::Instant> = None;
        loop {
            if let Some(at) = busy_since {
                let ready = at + MIN_FLUSH_INTERVAL;
                let now = std::time::Instant::now();
                if ready > now {
                    std::thread::sleep(ready - now);
                }
            }
            let (target, flushed) = {
                let mut state = hold_commit(&self.state);
                let flushed = self.done.borrow().0;
                if state.requested == flushed {
                    state.flushing = false;
                    return;
                }
                (state.requested, flushed)
            };
            busy_since = (target - flushed > 1).then(std::time::Instant::now);
            let result = db.flush();
            if let Err(error) = &result {
                tracing::error!(%error, "flushing the database failed");
            }
            self.done.send_modify(|(flushed, failed)| {
                *flushed = target;
                if let Err(error) = result {
                    *failed = Some((target, StorageError::from(error).is_disk_full()));
                }
            });
        }
    }
}

fn hold_commit(lock: &Mutex<CommitState>) -> MutexGuard<'_, CommitState> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
        crate::fsutil::create_private_dir(path)?;
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
        crate::fsutil::make_private_tree(path)?;
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

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write this caller made so far durable, without blocking
    /// the runtime. Concurrent callers share flushes (group commit): one
    /// flusher runs at a time, and each flush covers every caller that
    /// arrived before it started. (sled's own `flush_async` is known to
    /// deadlock; a blocking flush on the blocking pool is not.)
    pub async fn flush_async(&self) -> Result<(), StorageError> {
        let ticket = {
            let mut state = hold_commit(&self.commit.state);
            state.requested += 1;
            let ticket = state.requested;
            if !state.flushing {
                state.flushing = true;
                let db = self.db.clone();
                let commit = self.commit.clone();
                tokio::task::spawn_blocking(move || commit.flush_loop(&db));
            }
            ticket
        };
        let mut done = self.commit.done.subscribe();
        loop {
            let (flushed, failed) = *done.borrow_and_update();
            if flushed >= ticket {
                return match failed {
                    Some((at, true)) if at >= ticket => Err(StorageError::Files(
                        std::io::Error::from(std::io::ErrorKind::StorageFull),
                    )),
                    Some((at, false)) if at >= ticket => Err(StorageError::Corrupt(
                        "flushing the database failed; see the log".into(),
                    )),
                    _ => Ok(()),
                };
            }
            if done.changed().await.is_err() {
                return Err(StorageError::Corrupt("the flusher stopped".into()));
            }
        }
    }

    // ---- sites ----

    /// Stores a new site; false when the id is taken.
    pub fn insert_site(&self, site: &Site) -> Result<bool, StorageError> {
        let _guard = hold(&self.sites_lock);
        let swapped = self.sites.compare_and_swap(
            site.site_id.as_bytes(),
            None as Option<&[u8]>,
            Some(encode(site)),
        )?;
        if swapped.is_ok() && site.webhook.is_some() {
            self.webhook_sites
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(site.site_id.clone());
        }
        Ok(swapped.is_ok())
    }

    pub fn get_site(&self, site_id: &str) -> Result<Option<Site>, StorageError> {
        self.sites
            .get(site_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn put_site(&self, site: &Site) -> Result<(), StorageError> {
        self.sites.insert(site.site_id.as_bytes(), encode(site))?;
        let mut webhooks = self
            .webhook_sites
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if site.webhook.is_some() {
            webhooks.insert(site.site_id.clone());
        } else {
            webhooks.remove(&site.site_id);
        }
        Ok(())
    }

    /// Changes a site under the sites lock, so that concurrent changes of
    /// different settings (name, policy, webhook) do not undo each other.
    /// Returns the site after, or None when there is none.
    pub fn update_site(
        &self,
        site_id: &str,
        change: impl FnOnce(&mut Site) -> bool,
    ) -> Result<Option<Site>, StorageError> {
        let _guard = hold(&self.sites_lock);
        let Some(mut site) = self.get_site(site_id)? else {
            return Ok(None);
        };
        if change(&mut site) {
            self.put_site(&site)?;
        }
        Ok(Some(site))
    }

    /// Sites ordered by id, keeping those `visible` lets through.
    pub fn list_sites(
        &self,
        page_token: &str,
        limit: usize,
        visible: impl Fn(&Site) -> bool,
    ) -> Result<Page<Site>, StorageError> {
        page(
            &self.sites,
            b"sites\0",
            b"",
            page_token,
            limit,
            false,
            |_, v| {
                let site: Site = decode(v)?;
                Ok(visible(&site).then_some(site))
            },
        )
    }

    // ---- users ----

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

    fn user_counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.user_counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The number of users of the site; callers hold the users lock.
    fn site_user_count(&self, site_id: &str) -> Result<usize, StorageError> {
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
    fn write_user(&self, user: &User) -> Result<(), StorageError> {
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
    fn import_staged(&self, site_id: &str, users: &[&User]) -> Result<(), StorageError> {
        let import_id = crate::model::time_ordered_id();
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

    fn stage_import(&self, import_id: &str, users: &[&User]) -> Result<(), StorageError> {
        for (row, user) in users.iter().enumerate() {
            self.staged_users
                .insert(key2(import_id, &format!("{row:06}")), encode(user))?;
        }
        Ok(())
    }

    /// Applies a committed import's staged rows (again, after a crash: the
    /// writes are idempotent), then removes them and the import's key.
    fn apply_import(&self, import_id: &str) -> Result<(), StorageError> {
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
    fn discard_import(&self, import_id: &str) {
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
    fn finish_user_imports(&self) -> Result<(), StorageError> {
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

    // ---- company passcodes ----

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
    fn copy_pending_lockout(&self, mut record: CompanyPasscodeRecord) -> Result<(), StorageError> {
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

    fn finish_pending_lockouts(&self) -> Result<(), StorageError> {
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

    // ---- devices ----

    /// Stores a newly enrolled device. `proven` is the device the enrolling
    /// client proved to be (by its current certificate): an active device of
    /// the same site with the same serial number is marked replaced by the
    /// new one. A serial number alone proves nothing, so an active device
    /// claiming it stays enrolled; the one of them enrolled last is named.
    /// A device id that is taken is refused, storing nothing.
    pub fn enroll_device(
        &self,
        device: &mut Device,
        proven: Option<&str>,
    ) -> Result<Enrolled, StorageError> {
        let _guard = hold(&self.devices_lock);
        if self.get_device(&device.device_id)?.is_some() {
            return Err(StorageError::Refused(format!(
                "device id {} is taken",
                device.device_id
            )));
        }
        let serial = device.facts.serial_number.clone();
        // Index entries first: the device record is the commit point.
        let write_indexes = |device: &Device| -> Result<(), StorageError> {
            self.site_devices
                .insert(key2(&device.site_id, &device.device_id), &[])?;
            if !serial.is_empty() {
                self.serial_devices
                    .insert(key3(&device.site_id, &serial, &device.device_id), &[])?;
            }
            Ok(())
        };
        if let Some(old_id) = proven {
            let _old_guard = hold_stripe(&self.device_locks, old_id);
            if let Some(mut old) = self.load_device(old_id)?.map(Arc::unwrap_or_clone)
                && old.status == DeviceStatus::Active
                && old.site_id == device.site_id
                && old.facts.serial_number == serial
            {
                old.status = DeviceStatus::Replaced;
                old.replaced_by_device_id = Some(device.device_id.clone());
                device.replaces_device_id = Some(old_id.to_owned());
                write_indexes(device)?;
                self.put_device(device)?;
                // The old record changes only once the new one exists.
                self.put_device(&old)?;
                return Ok(Enrolled::Replacing(old_id.to_owned()));
            }
        }
        let duplicate_of = if serial.is_empty() {
            None
        } else {
            self.active_device_with_serial(&device.site_id, &serial)?
        };
        write_indexes(device)?;
        self.put_device(device)?;
        Ok(match duplicate_of {
            Some(other) => Enrolled::AlongsideSameSerial(other),
            None => Enrolled::New,
        })
    }

    /// The active device of the site with this serial number that enrolled
    /// last (by `enrolled_at`, then id), if any. Callers hold the devices lock.
    fn active_device_with_serial(
        &self,
        site_id: &str,
        serial: &str,
    ) -> Result<Option<String>, StorageError> {
        let prefix = key3(site_id, serial, "");
        let mut last: Option<(Millis, String)> = None;
        for key in self.serial_devices.scan_prefix(&prefix).keys() {
            let key = key?;
            let device_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let device = {
                let _stripe = hold_stripe(&self.device_locks, &device_id);
                self.load_device(&device_id)?
            };
            // A serial with a NUL can share a prefix with another: the
            // record decides.
            if let Some(device) = device
                && device.status == DeviceStatus::Active
                && device.site_id == site_id
                && device.facts.serial_number == serial
            {
                let candidate = (device.enrolled_at, device_id);
                if last.as_ref().is_none_or(|last| candidate > *last) {
                    last = Some(candidate);
                }
            }
        }
        Ok(last.map(|(_, device_id)| device_id))
    }

    /// Schema 4 lists every device enrolled with a serial number: built
    /// once from the device records (idempotent, so a crash during the
    /// upgrade only repeats it).
    fn index_device_serials(&self) -> Result<(), StorageError> {
        let mut indexed = 0usize;
        for entry in self.devices.iter() {
            let (_, value) = entry?;
            let device: Device = decode(&value)?;
            if !device.facts.serial_number.is_empty() {
                self.serial_devices.insert(
                    key3(
                        &device.site_id,
                        &device.facts.serial_number,
                        &device.device_id,
                    ),
                    &[],
                )?;
                indexed += 1;
            }
        }
        if indexed > 0 {
            tracing::info!(indexed, "device serial numbers indexed");
        }
        Ok(())
    }

    /// Stores a security alert and the notifications it sends.
    pub fn put_alert(
        &self,
        alert: &Alert,
        notifications: &[Notification],
    ) -> Result<(), StorageError> {
        self.alerts
            .insert(key2(&alert.site_id, &alert.alert_id), encode(alert))?;
        for notification in notifications {
            self.put_notification(notification)?;
        }
        Ok(())
    }

    /// A device as stored, shared with the cache (callers only read it).
    pub fn get_device(&self, device_id: &str) -> Result<Option<Arc<Device>>, StorageError> {
        if let Some(device) = self.cached_device(device_id) {
            return Ok(Some(device));
        }
        let _guard = hold_stripe(&self.device_locks, device_id);
        self.load_device(device_id)
    }

    fn cached_device(&self, device_id: &str) -> Option<Arc<Device>> {
        self.device_cache
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(device_id)
            .cloned()
    }

    /// Reads a device for a caller holding its stripe lock: no write can
    /// land between the read from sled and filling the cache.
    fn load_device(&self, device_id: &str) -> Result<Option<Arc<Device>>, StorageError> {
        if let Some(device) = self.cached_device(device_id) {
            return Ok(Some(device));
        }
        let Some(value) = self.devices.get(device_id.as_bytes())? else {
            return Ok(None);
        };
        let device = Arc::new(decode::<Device>(&value)?);
        self.cache_device(device.clone());
        Ok(Some(device))
    }

    /// Writes a device record and its cached copy. Callers hold its stripe
    /// lock, or made the device and have not returned its id yet.
    fn put_device(&self, device: &Device) -> Result<(), StorageError> {
        self.devices
            .insert(device.device_id.as_bytes(), encode(device))?;
        self.cache_device(Arc::new(device.clone()));
        Ok(())
    }

    fn cache_device(&self, device: Arc<Device>) {
        self.device_cache
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(device.device_id.clone(), device);
    }

    /// Changes a device under the devices lock; `change` returns false to
    /// leave it as it was. Returns the device after.
    pub fn update_device(
        &self,
        device_id: &str,
        change: impl FnOnce(&mut Device) -> bool,
    ) -> Result<Option<Device>, StorageError> {
        let _guard = hold_stripe(&self.device_locks, device_id);
        let Some(mut device) = self.load_device(device_id)?.map(Arc::unwrap_or_clone) else {
            return Ok(None);
        };
        if change(&mut device) {
            self.put_device(&device)?;
        }
        Ok(Some(device))
    }

    /// A site's devices ordered by id, keeping those `keep` lets through.
    pub fn list_devices(
        &self,
        site_id: &str,
        page_token: &str,
        limit: usize,
        keep: impl Fn(&Device) -> bool,
    ) -> Result<Page<Device>, StorageError> {
        let prefix = prefix(site_id);
        page(
            &self.site_devices,
            b"devices\0",
            &prefix,
            page_token,
            limit,
            false,
            |key, _| {
                let device_id = String::from_utf8_lossy(&key[prefix.len()..]);
                Ok(self
                    .get_device(&device_id)?
                    .filter(|d| keep(d))
                    .map(Arc::unwrap_or_clone))
            },
        )
    }

    // ---- actions ----

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
    fn put_changed_action(&self, action: &Action) -> Result<(), StorageError> {
        self.actions.insert(
            action_key(&action.site_id, &action.action_id)?,
            encode_action(action),
        )?;
        self.open_commands().track(action);
        Ok(())
    }

    fn lock_device_actions(&self, device_id: &str) -> MutexGuard<'_, ()> {
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
    fn undo_command(
        &self,
        device_id: &str,
        action_id: &str,
        previous_reset: Option<Option<crate::model::LatestReset>>,
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
    fn move_actions_to_site_keys(&self) -> Result<(), StorageError> {
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

    // ---- audit trail ----

    pub fn append_audit(&self, device_id: &str, entry: &AuditEntry) -> Result<(), StorageError> {
        self.device_audit.insert(
            key2(device_id, &crate::model::time_ordered_id()),
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

    // ---- alerts and outbox ----

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

    #[cfg(test)]
    fn set_schema_version_for_test(&self, version: u32) -> Result<(), StorageError> {
        self.meta
            .insert(SCHEMA_KEY, version.to_be_bytes().as_slice())?;
        Ok(())
    }
}

/// The smallest key above every key that starts with `prefix`: the prefix
/// with its last byte below 0xFF raised and the 0xFF bytes after it dropped
/// (site tags are hash bytes, so about one site in 256 has a tag ending in
/// 0xFF). None when every byte is 0xFF (or there is none): no key is above.
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if let Some(raised) = last.checked_add(1) {
            next.push(raised);
            return Some(next);
        }
    }
    None
}

/// Reads one page of `tree` under `prefix`, after the key in `page_token`,
/// in key order or reversed. `keep` decodes an entry and may skip it. A
/// token is the hex of `list` (the name and scope of the listing) and the
/// last key given: a token of another listing is a [`StorageError::BadPageToken`]
/// even where its key would fit.
fn page<T>(
    tree: &sled::Tree,
    list: &[u8],
    prefix: &[u8],
    page_token: &str,
    limit: usize,
    newest_first: bool,
    keep: impl Fn(&[u8], &[u8]) -> Result<Option<T>, StorageError>,
) -> Result<Page<T>, StorageError> {
    use std::ops::Bound;
    let after = if page_token.is_empty() {
        None
    } else {
        let token = hex::decode(page_token).map_err(|_| StorageError::BadPageToken)?;
        let key = token
            .strip_prefix(list)
            .filter(|key| key.starts_with(prefix))
            .ok_or(StorageError::BadPageToken)?;
        Some(key.to_vec())
    };
    let upper_bound = prefix_successor(prefix).map_or(Bound::Unbounded, Bound::Excluded);
    let range: (Bound<Vec<u8>>, Bound<Vec<u8>>) = match (&after, newest_first) {
        (None, _) => (Bound::Included(prefix.to_vec()), upper_bound),
        (Some(key), false) => (Bound::Excluded(key.clone()), upper_bound),
        (Some(key), true) => (
            Bound::Included(prefix.to_vec()),
            Bound::Excluded(key.clone()),
        ),
    };
    let iter = tree.range(range);
    let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if newest_first {
        Box::new(iter.rev())
    } else {
        Box::new(iter)
    };
    let mut items = Vec::new();
    let mut last_key = None;
    let mut has_more = false;
    for entry in iter {
        let (key, value) = entry?;
        if let Some(item) = keep(&key, &value)? {
            if items.len() == limit {
                has_more = true;
                break;
            }
            items.push(item);
            last_key = Some(key);
        }
    }
    let next_page_token = match (has_more, last_key) {
        (true, Some(key)) => hex::encode([list, key.as_ref()].concat()),
        _ => String::new(),
    };
    Ok(Page {
        items,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PasscodeState;

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
            &crate::crypto::os_random(),
        )
        .into_uuid();
        with_site_tag(id, site_id)
    }

    /// An id as schema 2 made them: no site tag.
    fn schema_2_id_at(at: Millis) -> String {
        uuid::Builder::from_unix_timestamp_millis(
            u64::try_from(at).expect("after 1970"),
            &crate::crypto::os_random(),
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
        use crate::model::{ActionStatus, ActionType, CommandPayload};
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
        use crate::model::ActionStatus;
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
                a.advance(crate::model::ActionStatus::Expired, "expired", now_millis())
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
        use crate::model::ActionStatus;
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
        use crate::model::{ActionStatus, FailureCode};
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
        use crate::model::{AlertKind, CompanyPasscodeRecord, PendingLockout};
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
            .put_site(&crate::model::Site {
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
