//! The columns of the device and action rows, each filled from its record
//! in one place for every statement that writes it: one-row INSERT and
//! UPDATE, the `unnest` batches of the group commit, and the import's COPY.
//! A column filled two ways would let a query find a row by a value its
//! record does not hold.

use mdm_core::model::{Action, Device, Millis};
use tokio_postgres::types::Type;

use crate::db::{Param, R, encode, tag};

/// A device row: `device_id, site_id, serial_number, status, platform,
/// user_email, enrolled_at, record` ([`DeviceRow::COLUMNS`]).
pub(crate) struct DeviceRow<'a> {
    device_id: &'a str,
    site_id: &'a str,
    serial_number: &'a [u8],
    status: String,
    platform: String,
    user_email: &'a str,
    enrolled_at: Millis,
    record: Vec<u8>,
}

impl<'a> DeviceRow<'a> {
    pub(crate) const COLUMNS: &'static str =
        "device_id, site_id, serial_number, status, platform, user_email, enrolled_at, record";
    pub(crate) const TYPES: [Type; 8] = [
        Type::TEXT,
        Type::TEXT,
        Type::BYTEA,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::BYTEA,
    ];

    /// The row of `device`, stored under `device_id` (its own id, or the
    /// id of the row a re-enrollment replaces).
    pub(crate) fn of(device_id: &'a str, device: &'a Device) -> R<Self> {
        Ok(Self {
            device_id,
            site_id: &device.site_id,
            serial_number: device.facts.serial_number.as_bytes(),
            status: tag(&device.status),
            platform: tag(&device.facts.platform),
            user_email: &device.user_email,
            enrolled_at: device.enrolled_at,
            record: encode(device)?,
        })
    }

    /// `$1` … `$8` in [`DeviceRow::COLUMNS`] order.
    pub(crate) fn params(&self) -> [Param<'_>; 8] {
        [
            &self.device_id,
            &self.site_id,
            &self.serial_number,
            &self.status,
            &self.platform,
            &self.user_email,
            &self.enrolled_at,
            &self.record,
        ]
    }
}

/// Device rows as one array per column, for `unnest($1::text[], …)`.
#[derive(Default)]
pub(crate) struct DeviceColumns<'a> {
    device_ids: Vec<&'a str>,
    site_ids: Vec<&'a str>,
    serial_numbers: Vec<&'a [u8]>,
    statuses: Vec<String>,
    platforms: Vec<String>,
    user_emails: Vec<&'a str>,
    enrolled_ats: Vec<Millis>,
    records: Vec<Vec<u8>>,
}

impl<'a> DeviceColumns<'a> {
    /// The rows of `devices`, each stored under its paired id.
    pub(crate) fn of(devices: &[(&'a str, &'a Device)]) -> R<Self> {
        let mut columns = Self::default();
        for (device_id, device) in devices {
            let row = DeviceRow::of(device_id, device)?;
            columns.device_ids.push(row.device_id);
            columns.site_ids.push(row.site_id);
            columns.serial_numbers.push(row.serial_number);
            columns.statuses.push(row.status);
            columns.platforms.push(row.platform);
            columns.user_emails.push(row.user_email);
            columns.enrolled_ats.push(row.enrolled_at);
            columns.records.push(row.record);
        }
        Ok(columns)
    }

    /// `$1` … `$8` in [`DeviceRow::COLUMNS`] order.
    pub(crate) fn params(&self) -> [Param<'_>; 8] {
        [
            &self.device_ids,
            &self.site_ids,
            &self.serial_numbers,
            &self.statuses,
            &self.platforms,
            &self.user_emails,
            &self.enrolled_ats,
            &self.records,
        ]
    }
}

/// An action row: `action_id, site_id, device_id, action_type, status,
/// created_by, created_at, queued, expires_at, record` ([`ActionRow::COLUMNS`]).
pub(crate) struct ActionRow<'a> {
    action_id: &'a str,
    site_id: &'a str,
    device_id: &'a str,
    action_type: String,
    status: String,
    created_by: &'a str,
    created_at: Millis,
    queued: bool,
    expires_at: Millis,
    record: Vec<u8>,
}

impl<'a> ActionRow<'a> {
    pub(crate) const COLUMNS: &'static str = "action_id, site_id, device_id, action_type, status, \
         created_by, created_at, queued, expires_at, record";
    pub(crate) const TYPES: [Type; 10] = [
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::BOOL,
        Type::INT8,
        Type::BYTEA,
    ];

    pub(crate) fn of(action: &'a Action) -> R<Self> {
        Ok(Self {
            action_id: &action.action_id,
            site_id: &action.site_id,
            device_id: &action.device_id,
            action_type: tag(&action.action_type),
            status: tag(&action.status),
            created_by: &action.created_by,
            created_at: action.created_at,
            queued: action.is_queued(),
            expires_at: action.expires_at,
            record: encode(action)?,
        })
    }

    /// `$1` … `$10` in [`ActionRow::COLUMNS`] order.
    pub(crate) fn params(&self) -> [Param<'_>; 10] {
        [
            &self.action_id,
            &self.site_id,
            &self.device_id,
            &self.action_type,
            &self.status,
            &self.created_by,
            &self.created_at,
            &self.queued,
            &self.expires_at,
            &self.record,
        ]
    }
}

/// Action rows as one array per column, for `unnest($1::text[], …)`.
#[derive(Default)]
pub(crate) struct ActionColumns<'a> {
    action_ids: Vec<&'a str>,
    site_ids: Vec<&'a str>,
    device_ids: Vec<&'a str>,
    action_types: Vec<String>,
    statuses: Vec<String>,
    created_bys: Vec<&'a str>,
    created_ats: Vec<Millis>,
    queued: Vec<bool>,
    expires_ats: Vec<Millis>,
    records: Vec<Vec<u8>>,
}

impl<'a> ActionColumns<'a> {
    pub(crate) fn of(actions: &'a [Action]) -> R<Self> {
        let mut columns = Self::default();
        for action in actions {
            let row = ActionRow::of(action)?;
            columns.action_ids.push(row.action_id);
            columns.site_ids.push(row.site_id);
            columns.device_ids.push(row.device_id);
            columns.action_types.push(row.action_type);
            columns.statuses.push(row.status);
            columns.created_bys.push(row.created_by);
            columns.created_ats.push(row.created_at);
            columns.queued.push(row.queued);
            columns.expires_ats.push(row.expires_at);
            columns.records.push(row.record);
        }
        Ok(columns)
    }

    /// `$1` … `$10` in [`ActionRow::COLUMNS`] order.
    pub(crate) fn params(&self) -> [Param<'_>; 10] {
        [
            &self.action_ids,
            &self.site_ids,
            &self.device_ids,
            &self.action_types,
            &self.statuses,
            &self.created_bys,
            &self.created_ats,
            &self.queued,
            &self.expires_ats,
            &self.records,
        ]
    }

    /// `$1`, `$5`, `$8`, `$9`, `$10`: what a change can touch (`action_id,
    /// status, queued, expires_at, record`); ids, devices, kinds and
    /// creators never change.
    pub(crate) fn changed_params(&self) -> [Param<'_>; 5] {
        [
            &self.action_ids,
            &self.statuses,
            &self.queued,
            &self.expires_ats,
            &self.records,
        ]
    }
}
