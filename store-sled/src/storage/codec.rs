//! Keys and encoding: JSON records, postcard action records behind a
//! layout byte, time-ordered ids tagged with their site, and paging.

use super::*;

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("domain records always serialize")
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(e.to_string()))
}

/// First byte of an action record in postcard, layout 1. Action records
/// are written twice per command and carry its timeline: postcard makes
/// them about a third the size of JSON, and sled's cost grows with the
/// bytes it copies and logs. postcard is not self-describing, so a change
/// to `Action` (or what it holds) needs a new layout byte, reading the old
/// one into the new type; `an_action_record_in_layout_1_still_decodes`
/// fails first. Records older than the byte are JSON (they start with `{`).
pub(super) const ACTION_LAYOUT_1: u8 = 1;

pub(super) fn encode_action(action: &Action) -> Vec<u8> {
    postcard::to_extend(action, vec![ACTION_LAYOUT_1]).expect("domain records always serialize")
}

pub(super) fn decode_action(bytes: &[u8]) -> Result<Action, StorageError> {
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

/// The smallest time-ordered id (UUID v7) of `at`: ids of later records sort after it.
pub(super) fn first_id_at(at: Millis) -> String {
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(at).unwrap_or(0), &[0; 10])
        .into_uuid()
        .to_string()
}

/// Four bytes of a site id's SHA-256: the first bytes of the keys of the
/// site's action records, and the last bytes of the ids made for them.
pub(super) fn site_tag(site_id: &str) -> [u8; 4] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(site_id.as_bytes());
    [digest[0], digest[1], digest[2], digest[3]]
}

pub(super) fn with_site_tag(id: uuid::Uuid, site_id: &str) -> String {
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
pub(super) fn action_key(site_id: &str, action_id: &str) -> Result<[u8; 20], StorageError> {
    let id = uuid::Uuid::try_parse(action_id)
        .map_err(|_| StorageError::Corrupt(format!("action id {action_id:?} is not a UUID")))?;
    Ok(record_key(site_tag(site_id), &id))
}

/// Where a record made since schema 3 is, read from its id alone.
pub(super) fn key_from_id(action_id: &str) -> Option<[u8; 20]> {
    let id = uuid::Uuid::try_parse(action_id).ok()?;
    let tag = <[u8; 4]>::try_from(&id.as_bytes()[12..]).ok()?;
    Some(record_key(tag, &id))
}

pub(super) fn record_key(tag: [u8; 4], id: &uuid::Uuid) -> [u8; 20] {
    let mut key = [0; 20];
    key[..4].copy_from_slice(&tag);
    key[4..].copy_from_slice(id.as_bytes());
    key
}

pub(super) fn tag_of_key(key: &[u8]) -> Result<u32, StorageError> {
    key.get(..4)
        .and_then(|tag| <[u8; 4]>::try_from(tag).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StorageError::Corrupt("an action key is too short".into()))
}

/// How far back an open command can have been created: its longest life,
/// and a day for clock adjustments.
pub(super) fn open_command_horizon() -> Millis {
    let longest = mdm_core::model::MAX_COMMAND_TTL + std::time::Duration::from_secs(86_400);
    Millis::try_from(longest.as_millis()).unwrap_or(Millis::MAX)
}

/// `a \0 b`: composite keys sort by `a`, then `b`.
pub(super) fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + b.len() + 1);
    key.extend_from_slice(a.as_bytes());
    key.push(0);
    key.extend_from_slice(b.as_bytes());
    key
}

pub(super) fn prefix(a: &str) -> Vec<u8> {
    key2(a, "")
}

/// `a \0 b \0 c`.
pub(super) fn key3(a: &str, b: &str, c: &str) -> Vec<u8> {
    let mut key = key2(a, b);
    key.push(0);
    key.extend_from_slice(c.as_bytes());
    key
}

/// The smallest key above every key that starts with `prefix`: the prefix
/// with its last byte below 0xFF raised and the 0xFF bytes after it dropped
/// (site tags are hash bytes, so about one site in 256 has a tag ending in
/// 0xFF). None when every byte is 0xFF (or there is none): no key is above.
pub(super) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
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
pub(super) fn page<T>(
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
