//! Enrolled devices and their audit trails.

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use mdm_core::model::{AuditEntry, CompanyPasscodeRecord, Device, DeviceStatus, now_millis};
use mdm_core::store::{
    Change, DeviceFilter, DeviceStore, Enrolled, Page, PageRequest, StoreResult,
};

use crate::PgStore;
use crate::db::{
    self, Fail, R, Select, encode, fetch_limit, has_nul, keyed, page, query, query_opt, record,
    records, tag, unit,
};

/// First key of the transaction-scoped advisory locks that serialise a
/// site's enrollments (the second is a hash of the site id): the check for
/// an active device with the same serial number spans rows.
const ENROLL_LOCK: i32 = 0x6d64_6501;

pub(crate) async fn insert_device<C: GenericClient>(c: &C, device: &Device) -> R<()> {
    db::execute(
        c,
        "INSERT INTO devices
         (device_id, site_id, serial_number, status, platform, user_email, enrolled_at, record)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &device.device_id,
            &device.site_id,
            &device.facts.serial_number.as_bytes(),
            &tag(&device.status),
            &tag(&device.facts.platform),
            &device.user_email,
            &device.enrolled_at,
            &encode(device)?,
        ],
    )
    .await?;
    Ok(())
}

/// Writes a changed device over the row of `device_id`.
pub(crate) async fn write_device<C: GenericClient>(
    c: &C,
    device_id: &str,
    device: &Device,
) -> R<()> {
    db::execute(
        c,
        "UPDATE devices SET site_id = $2, serial_number = $3, status = $4, platform = $5,
         user_email = $6, enrolled_at = $7, record = $8
         WHERE device_id = $1",
        &[
            &device_id,
            &device.site_id,
            &device.facts.serial_number.as_bytes(),
            &tag(&device.status),
            &tag(&device.facts.platform),
            &device.user_email,
            &device.enrolled_at,
            &encode(device)?,
        ],
    )
    .await?;
    Ok(())
}

/// The device's row, locked until the transaction ends: every change to
/// the device, or to its commands, takes this lock first.
pub(crate) async fn lock_device<C: GenericClient>(c: &C, device_id: &str) -> R<Option<Device>> {
    query_opt(
        c,
        "SELECT record FROM devices WHERE device_id = $1 FOR UPDATE",
        &[&device_id],
    )
    .await?
    .map(|row| record(&row))
    .transpose()
}

impl PgStore {
    async fn change_device(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
        soon: bool,
    ) -> StoreResult<Option<Device>> {
        if has_nul(device_id) {
            return Ok(None);
        }
        macro_rules! body {
            ($tx:ident) => {{
                match lock_device(&$tx, device_id).await? {
                    None => None,
                    Some(mut device) => {
                        if change(&mut device) {
                            write_device(&$tx, device_id, &device).await?;
                        }
                        Some(device)
                    }
                }
            }};
        }
        if soon {
            unit!(self, soon, |tx| { body!(tx) })
        } else {
            unit!(self, |tx| { body!(tx) })
        }
    }
}

#[async_trait]
impl DeviceStore for PgStore {
    async fn enroll_device(
        &self,
        device: &mut Device,
        proven: Option<&str>,
    ) -> StoreResult<Enrolled> {
        let (stored, enrolled) = unit!(self, retry, |tx| {
            let mut new = device.clone();
            db::execute(
                &tx,
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&ENROLL_LOCK, &new.site_id],
            )
            .await?;
            let mut replaced = None;
            if let Some(old_id) = proven.filter(|id| !has_nul(id))
                && let Some(mut old) = lock_device(&tx, old_id).await?
                && old.status == DeviceStatus::Active
                && old.site_id == new.site_id
                && old.facts.serial_number == new.facts.serial_number
            {
                old.status = DeviceStatus::Replaced;
                old.replaced_by_device_id = Some(new.device_id.clone());
                new.replaces_device_id = Some(old_id.to_owned());
                insert_device(&tx, &new).await?;
                write_device(&tx, old_id, &old).await?;
                replaced = Some(old_id.to_owned());
            }
            let enrolled = match replaced {
                Some(old_id) => Enrolled::Replacing(old_id),
                None => {
                    let mut duplicate_of = None;
                    if !new.facts.serial_number.is_empty() {
                        duplicate_of = query_opt(
                            &tx,
                            "SELECT device_id FROM devices
                             WHERE site_id = $1 AND serial_number = $2 AND status = 'Active'
                             ORDER BY enrolled_at DESC, device_id DESC LIMIT 1",
                            &[&new.site_id, &new.facts.serial_number.as_bytes()],
                        )
                        .await?
                        .map(|row| row.try_get::<_, String>(0))
                        .transpose()?;
                    }
                    insert_device(&tx, &new).await?;
                    match duplicate_of {
                        Some(other) => Enrolled::AlongsideSameSerial(other),
                        None => Enrolled::New,
                    }
                }
            };
            let passcode = query_opt(
                &tx,
                "SELECT record FROM passcodes WHERE site_id = $1 FOR UPDATE",
                &[&new.site_id],
            )
            .await?;
            if let Some(row) = passcode {
                let mut passcode: CompanyPasscodeRecord = record(&row)?;
                passcode.enrollments += 1;
                passcode.last_used_at = Some(now_millis());
                db::execute(
                    &tx,
                    "UPDATE passcodes SET record = $2 WHERE site_id = $1",
                    &[&new.site_id, &encode(&passcode)?],
                )
                .await?;
            }
            (new, enrolled)
        })?;
        *device = stored;
        Ok(enrolled)
    }

    async fn get_device(&self, device_id: &str) -> StoreResult<Option<Arc<Device>>> {
        if has_nul(device_id) {
            return Ok(None);
        }
        async {
            let client = self.client().await?;
            query_opt(
                &client,
                "SELECT record FROM devices WHERE device_id = $1",
                &[&device_id],
            )
            .await?
            .map(|row| record(&row).map(Arc::new))
            .transpose()
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn update_device(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
    ) -> StoreResult<Option<Device>> {
        self.change_device(device_id, change, false).await
    }

    async fn update_device_soon(
        &self,
        device_id: &str,
        change: Change<'_, Device>,
    ) -> StoreResult<Option<Device>> {
        self.change_device(device_id, change, true).await
    }

    async fn list_devices(
        &self,
        site_id: &str,
        filter: &DeviceFilter,
        page_request: PageRequest<'_>,
    ) -> StoreResult<Page<Device>> {
        let after = db::after(page_request.token, "devices", &[site_id])?;
        async {
            let client = self.client().await?;
            let mut select = Select::new("SELECT record, device_id FROM devices WHERE TRUE");
            select.and("site_id = $", site_id.to_owned());
            if let Some(after) = after {
                select.and("device_id > $", after);
            }
            if let Some(platform) = filter.platform {
                select.and("platform = $", tag(&platform));
            }
            if let Some(status) = filter.status {
                select.and("status = $", tag(&status));
            }
            if !filter.user_email.is_empty() {
                select.and("user_email = $", filter.user_email.clone());
            }
            let rows = select
                .rows(&client, "device_id", fetch_limit(page_request.limit))
                .await?;
            Ok(page(
                keyed(&rows)?,
                page_request.limit,
                "devices",
                &[site_id],
            ))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn append_audit(&self, device_id: &str, entry: &AuditEntry) -> StoreResult<()> {
        async {
            let client = self.client().await?;
            db::execute(
                &client,
                "INSERT INTO audit (device_id, record) VALUES ($1, $2)",
                &[&device_id, &encode(entry)?],
            )
            .await?;
            Ok(())
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn list_audit(&self, device_id: &str, limit: usize) -> StoreResult<Vec<AuditEntry>> {
        if has_nul(device_id) || limit == 0 {
            return Ok(Vec::new());
        }
        async {
            let client = self.client().await?;
            let rows = query(
                &client,
                "SELECT record FROM audit WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
                &[&device_id, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await?;
            records(&rows)
        }
        .await
        .map_err(Fail::into_store)
    }
}
