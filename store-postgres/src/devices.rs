//! Enrolled devices and their audit trails.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use mdm_core::model::{
    AuditEntry, CompanyPasscodeRecord, Device, DeviceStatus, Millis, now_millis,
};
use mdm_core::store::{
    Change, DeviceFilter, DeviceStore, Enrolled, Page, PageRequest, StoreError, StoreResult,
};
use tokio::sync::oneshot;

use crate::batch::{Combiner, copy_of};
use crate::db::{
    self, Fail, R, Select, encode, fetch_limit, has_nul, keyed, page, query, query_opt, record,
    records, tag, unit,
};
use crate::rows::{DeviceColumns, DeviceRow};
use crate::{PgStore, Pooled};

/// First key of the transaction-scoped advisory locks that serialise the
/// enrollments of one serial number in one site (the second is a hash of
/// both): the check for an active device with the same serial spans rows.
const ENROLL_LOCK: i32 = 0x6d64_6501;

pub(crate) async fn insert_device<C: GenericClient>(c: &C, device: &Device) -> R<()> {
    let row = DeviceRow::of(&device.device_id, device)?;
    db::execute(
        c,
        "INSERT INTO devices
         (device_id, site_id, serial_number, status, platform, user_email, enrolled_at, record)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &row.params(),
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
    let row = DeviceRow::of(device_id, device)?;
    db::execute(
        c,
        "UPDATE devices SET site_id = $2, serial_number = $3, status = $4, platform = $5,
         user_email = $6, enrolled_at = $7, record = $8
         WHERE device_id = $1",
        &row.params(),
    )
    .await?;
    Ok(())
}

/// Writes changed devices in one statement.
pub(crate) async fn write_devices<C: GenericClient>(c: &C, devices: &[(&str, &Device)]) -> R<()> {
    match devices {
        [] => Ok(()),
        [(device_id, device)] => write_device(c, device_id, device).await,
        _ => {
            let columns = DeviceColumns::of(devices)?;
            db::execute(
                c,
                "UPDATE devices AS d SET site_id = u.site_id, serial_number = u.serial_number,
                     status = u.status, platform = u.platform, user_email = u.user_email,
                     enrolled_at = u.enrolled_at, record = u.record
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[],
                             $6::text[], $7::bigint[], $8::bytea[])
                     AS u(device_id, site_id, serial_number, status, platform, user_email,
                          enrolled_at, record)
                 WHERE d.device_id = u.device_id",
                &columns.params(),
            )
            .await?;
            Ok(())
        }
    }
}

/// One `get_device` call waiting for a shared read.
pub(crate) struct DeviceRead {
    device_id: String,
    reply: oneshot::Sender<StoreResult<Option<Arc<Device>>>>,
}

/// Concurrent device reads (every call of an admin or a device starts
/// with one, and every connection is checked again every few seconds)
/// share one query.
pub(crate) fn read_combiner(db: Pooled) -> Combiner<DeviceRead> {
    Combiner::start(512, 2, move |jobs: Vec<DeviceRead>| {
        let db = db.clone();
        async move {
            let ids: Vec<&str> = jobs.iter().map(|j| j.device_id.as_str()).collect();
            match read_devices(&db, &ids).await {
                Ok(found) => {
                    for job in jobs {
                        let _ = job.reply.send(Ok(found.get(&job.device_id).cloned()));
                    }
                }
                Err(fail) => {
                    let error = fail.into_store();
                    for job in jobs {
                        let _ = job.reply.send(Err(copy_of(&error)));
                    }
                }
            }
        }
    })
}

async fn read_devices(db: &Pooled, ids: &[&str]) -> R<HashMap<String, Arc<Device>>> {
    let client = db.client().await?;
    let rows = query(
        &client,
        "SELECT device_id, record FROM devices WHERE device_id = ANY($1)",
        &[&ids],
    )
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        found.insert(row.try_get(0)?, Arc::new(db::record_at(&row, 1)?));
    }
    Ok(found)
}

/// One enrollment to count on its site's passcode.
pub(crate) struct PasscodeUse {
    site_id: String,
    at: Millis,
    reply: oneshot::Sender<StoreResult<()>>,
}

pub(crate) fn passcode_use_combiner(db: Pooled) -> Combiner<PasscodeUse> {
    Combiner::start(512, 2, move |uses: Vec<PasscodeUse>| {
        let db = db.clone();
        async move {
            let counted = count_uses(&db, &uses).await.map_err(Fail::into_store);
            for one in uses {
                let _ = one.reply.send(match &counted {
                    Ok(()) => Ok(()),
                    Err(error) => Err(copy_of(error)),
                });
            }
        }
    })
}

/// Adds enrollments to their sites' passcode records, durable soon; the
/// rows locked in site order, so that two batches cannot deadlock.
async fn count_uses(db: &Pooled, uses: &[PasscodeUse]) -> R<()> {
    let mut by_site: HashMap<&str, (u32, Millis)> = HashMap::new();
    for one in uses {
        let entry = by_site.entry(one.site_id.as_str()).or_insert((0, one.at));
        entry.0 += 1;
        entry.1 = entry.1.max(one.at);
    }
    let mut sites: Vec<&str> = by_site.keys().copied().collect();
    sites.sort_unstable();
    unit!(@once db, true, |tx| {
        let rows = query(
            &tx,
            "SELECT site_id, record FROM passcodes WHERE site_id = ANY($1)
             ORDER BY site_id FOR UPDATE",
            &[&sites],
        )
        .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let site_id: String = row.try_get(0)?;
            let mut passcode: CompanyPasscodeRecord = db::record_at(&row, 1)?;
            if let Some((count, at)) = by_site.get(site_id.as_str()) {
                passcode.enrollments = passcode.enrollments.saturating_add(*count);
                passcode.last_used_at = Some(passcode.last_used_at.unwrap_or(0).max(*at));
            }
            records.push(encode(&passcode)?);
            ids.push(site_id);
        }
        if !ids.is_empty() {
            db::execute(
                &tx,
                "UPDATE passcodes AS p SET record = u.record
                 FROM unnest($1::text[], $2::bytea[]) AS u(site_id, record)
                 WHERE p.site_id = u.site_id",
                &[&ids, &records],
            )
            .await?;
        }
    })
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
            if !new.facts.serial_number.is_empty() {
                db::execute(
                    &tx,
                    "SELECT pg_advisory_xact_lock($1, hashtext($2 || encode($3::bytea, 'hex')))",
                    &[
                        &ENROLL_LOCK,
                        &new.site_id,
                        &new.facts.serial_number.as_bytes(),
                    ],
                )
                .await?;
            }
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
            (new, enrolled)
        })?;
        // Counted after the device is stored, in a transaction of its own
        // that does not wait for the WAL and that concurrent enrollments
        // share: every enrollment of a site updates this one row, and
        // holding it until a durable commit would let one enrollment per
        // flush through. A crash can lose a count, never a device.
        let (reply, answer) = oneshot::channel();
        let bump = PasscodeUse {
            site_id: stored.site_id.clone(),
            at: now_millis(),
            reply,
        };
        match self.passcode_uses.submit(bump).await {
            Ok(()) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the store stopped before the enrollment was counted".into(),
                ))
            })?,
            Err(bump) => count_uses(&self.db, std::slice::from_ref(&bump))
                .await
                .map_err(Fail::into_store)?,
        }
        *device = stored;
        Ok(enrolled)
    }

    async fn get_device(&self, device_id: &str) -> StoreResult<Option<Arc<Device>>> {
        if has_nul(device_id) {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        let job = DeviceRead {
            device_id: device_id.to_owned(),
            reply,
        };
        match self.device_reads.submit(job).await {
            Ok(()) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the store stopped before the device was read".into(),
                ))
            }),
            Err(job) => {
                let mut found = read_devices(&self.db, &[job.device_id.as_str()])
                    .await
                    .map_err(Fail::into_store)?;
                Ok(found.remove(&job.device_id))
            }
        }
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
