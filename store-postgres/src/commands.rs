//! Commands and the action log.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use mdm_core::model::{Action, ActionStatus, ActionType, Device, Millis, now_millis};
use mdm_core::rules::{self, AgentReport};
use mdm_core::store::{
    ActionFilter, Canceled, CommandStore, Delivery, NewCommand, Page, PageRequest, Queued,
    Reported, StoreError, StoreResult,
};
use tokio::sync::oneshot;

use crate::batch::{Combiner, copy_of};
use crate::db::{
    self, Fail, Pipelined, R, Select, fetch_limit, has_nul, keyed, page, query, query_one,
    query_opt, record, records, tag, unit,
};
use crate::devices::{lock_device, write_devices};
use crate::outbox::insert_notifications;
use crate::rows::{ActionColumns, ActionRow};
use crate::{PgStore, Pooled};

// Every write of actions keeps `open_actions` (the commands not final yet,
// see the schema) in step in the same statement, through its RETURNING rows.

/// Adds the written actions that are queued to `open_actions`.
const OPEN_WRITTEN: &str = "opened AS (INSERT INTO open_actions (device_id, action_id, expires_at)
     SELECT device_id, action_id, expires_at FROM written WHERE queued
     ON CONFLICT DO NOTHING)";

/// Removes the written actions that are final from `open_actions`.
const CLOSE_WRITTEN: &str = "closed AS (DELETE FROM open_actions AS o USING written AS w
     WHERE NOT w.queued AND o.device_id = w.device_id AND o.action_id = w.action_id)";

async fn insert_action<C: GenericClient>(c: &C, action: &Action, upsert: bool) -> R<()> {
    let on_conflict = if upsert {
        "ON CONFLICT (action_id) DO UPDATE SET site_id = EXCLUDED.site_id,
             device_id = EXCLUDED.device_id, action_type = EXCLUDED.action_type,
             status = EXCLUDED.status, created_by = EXCLUDED.created_by,
             created_at = EXCLUDED.created_at, queued = EXCLUDED.queued,
             expires_at = EXCLUDED.expires_at, record = EXCLUDED.record"
    } else {
        ""
    };
    let sql = format!(
        "WITH written AS (
             INSERT INTO actions (action_id, site_id, device_id, action_type, status, created_by,
                                  created_at, queued, expires_at, record)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) {on_conflict}
             RETURNING device_id, action_id, queued, expires_at),
         {OPEN_WRITTEN}, {CLOSE_WRITTEN}
         SELECT 1"
    );
    db::execute(c, &sql, &ActionRow::of(action)?.params()).await?;
    Ok(())
}

/// Inserts new actions in one statement.
async fn insert_actions<C: GenericClient>(c: &C, actions: &[Action]) -> R<()> {
    if actions.is_empty() {
        return Ok(());
    }
    // New ids: nothing to close, and no conflict in `open_actions`.
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH written AS (
                 INSERT INTO actions (action_id, site_id, device_id, action_type, status,
                                      created_by, created_at, queued, expires_at, record)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::bigint[], $8::bool[], $9::bigint[],
                                      $10::bytea[])
                 RETURNING device_id, action_id, queued, expires_at),
             {OPEN_WRITTEN}
             SELECT 1"
        )
    });
    db::execute(c, &SQL, &ActionColumns::of(actions)?.params()).await?;
    Ok(())
}

/// Writes changed actions (their ids, devices and kinds never change, and
/// a final one is never queued again) in one statement.
async fn write_actions<C: GenericClient>(c: &C, actions: &[Action]) -> R<()> {
    if actions.is_empty() {
        return Ok(());
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH written AS (
                 UPDATE actions AS a
                 SET status = u.status, queued = u.queued, expires_at = u.expires_at,
                     record = u.record
                 FROM unnest($1::text[], $2::text[], $3::bool[], $4::bigint[], $5::bytea[])
                     AS u(action_id, status, queued, expires_at, record)
                 WHERE a.action_id = u.action_id
                 RETURNING a.device_id, a.action_id, a.queued),
             {CLOSE_WRITTEN}
             SELECT 1"
        )
    });
    db::execute(c, &SQL, &ActionColumns::of(actions)?.changed_params()).await?;
    Ok(())
}

/// The stored ones of these actions, by id.
async fn actions_by_id<C: GenericClient>(c: &C, ids: &[&str]) -> R<HashMap<String, Action>> {
    let rows = query(
        c,
        "SELECT record FROM actions WHERE action_id = ANY($1)",
        &[&ids],
    )
    .await?;
    actions_keyed_by_id(&rows)
}

fn actions_keyed_by_id(rows: &[tokio_postgres::Row]) -> R<HashMap<String, Action>> {
    Ok(records::<Action>(rows)?
        .into_iter()
        .map(|a| (a.action_id.clone(), a))
        .collect())
}

async fn queued_of<C: GenericClient>(c: &C, device_id: &str) -> R<Vec<Action>> {
    let rows = query(
        c,
        "SELECT a.record FROM open_actions AS o JOIN actions AS a USING (action_id)
         WHERE o.device_id = $1 ORDER BY o.action_id",
        &[&device_id],
    )
    .await?;
    let actions: Vec<Action> = records(&rows)?;
    Ok(actions.into_iter().filter(Action::is_queued).collect())
}

/// Calls of one kind a transaction takes at most, and such transactions
/// at once (the rest of the pool serves reads and other operations). Two,
/// not more: the calls that arrive meanwhile wait for a slot and share the
/// next transaction, so fewer at once means fewer, larger transactions
/// (a 10,000-device lock fan-out: 1,000 instead of 1,900, and no slower).
/// One would do as well there, but then one slow transaction would hold up
/// every device's commands.
const MAX_BATCH: usize = 256;
const BATCHES_IN_FLIGHT: usize = 2;

pub(crate) struct QueueJob {
    command: NewCommand,
    reply: oneshot::Sender<StoreResult<Queued>>,
}

pub(crate) struct ReportJob {
    device_id: String,
    action_id: String,
    reports: Vec<AgentReport>,
    now: Millis,
    reply: oneshot::Sender<StoreResult<Reported>>,
}

pub(crate) fn queue_combiner(db: Pooled) -> Combiner<QueueJob> {
    Combiner::start(MAX_BATCH, BATCHES_IN_FLIGHT, move |jobs| {
        let db = db.clone();
        async move { run_queue_jobs(&db, jobs).await }
    })
}

pub(crate) fn report_combiner(db: Pooled) -> Combiner<ReportJob> {
    Combiner::start(MAX_BATCH, BATCHES_IN_FLIGHT, move |jobs| {
        let db = db.clone();
        async move {
            match report_batch(&db, &jobs).await {
                Ok(outcomes) => {
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        let _ = job.reply.send(outcome);
                    }
                }
                Err(fail) => {
                    // Reports are one unit each only for their caller: a
                    // failed batch failed every one of them alike.
                    let error = fail.into_store();
                    for job in jobs {
                        let _ = job.reply.send(Err(copy_of(&error)));
                    }
                }
            }
        }
    })
}

/// A batch of queueing calls in one transaction; when it fails, each call
/// runs alone, so that one call's failure (an id already taken, say) is
/// that call's only.
async fn run_queue_jobs(db: &Pooled, jobs: Vec<QueueJob>) {
    if jobs.len() > 1 {
        let commands: Vec<&NewCommand> = jobs.iter().map(|job| &job.command).collect();
        let batched = queue_unit(db, &commands).await;
        if let Ok(outcomes) = batched {
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
            return;
        }
    }
    let mut alone = tokio::task::JoinSet::new();
    for job in jobs {
        let db = db.clone();
        alone.spawn(async move {
            let _ = job.reply.send(queue_one(&db, job.command).await);
        });
    }
    alone.join_all().await;
}

async fn queue_one(db: &Pooled, command: NewCommand) -> StoreResult<Queued> {
    queue_unit(db, &[&command])
        .await
        .and_then(|mut outcomes| outcomes.pop().expect("one command, one outcome"))
}

/// [`queue_batch`] as one pipelined transaction, run once more when
/// PostgreSQL aborted it for a conflict (it only reads before it writes).
async fn queue_unit(
    db: &Pooled,
    commands: &[&NewCommand],
) -> StoreResult<Vec<StoreResult<Queued>>> {
    db::retrying(|| async {
        let tx = Pipelined::connect(db, Pipelined::BEGIN).await?;
        let outcomes = queue_batch(&tx, commands).await?;
        tx.commit().await?;
        Ok(outcomes)
    })
    .await
}

/// Queues `commands` in order, as if one after the other: the devices'
/// rows locked (in id order, so that two batches cannot deadlock), every
/// device's queued commands read once, the rules applied in Rust, then
/// each table written in one statement. A command whose device is not
/// stored fails alone, writing nothing.
async fn queue_batch(tx: &Pipelined, commands: &[&NewCommand]) -> R<Vec<StoreResult<Queued>>> {
    let mut device_ids: Vec<&str> = commands
        .iter()
        .map(|c| c.action.device_id.as_str())
        .collect();
    device_ids.sort_unstable();
    device_ids.dedup();
    // Device records are read only when a reset changes one; otherwise the
    // rows are only locked. Both reads go out in one pipeline (executed in
    // order, so the second reads after the locks are held).
    let with_records = commands.iter().any(|c| c.latest_reset.is_some());
    let lock_devices = if with_records {
        "SELECT device_id, record FROM devices WHERE device_id = ANY($1)
         ORDER BY device_id FOR UPDATE"
    } else {
        "SELECT device_id FROM devices WHERE device_id = ANY($1) ORDER BY device_id FOR UPDATE"
    };
    let params: [db::Param<'_>; 1] = [&device_ids];
    let (device_rows, queued_rows) = tx
        .begin_with_reads(
            (lock_devices, &params),
            (
                "SELECT a.record FROM open_actions AS o JOIN actions AS a USING (action_id)
             WHERE o.device_id = ANY($1) ORDER BY o.action_id",
                &params,
            ),
        )
        .await?;
    let mut present: HashSet<String> = HashSet::with_capacity(device_rows.len());
    let mut devices: HashMap<String, Device> = HashMap::new();
    for row in device_rows {
        let device_id: String = row.try_get(0)?;
        if with_records {
            devices.insert(device_id.clone(), db::record_at(&row, 1)?);
        }
        present.insert(device_id);
    }
    let mut queued: HashMap<String, Vec<Action>> = HashMap::new();
    for action in records::<Action>(&queued_rows)? {
        if action.is_queued() {
            queued
                .entry(action.device_id.clone())
                .or_default()
                .push(action);
        }
    }
    let now = now_millis();
    let mut outcomes = Vec::with_capacity(commands.len());
    let mut inserted: Vec<Action> = Vec::new();
    let mut updated: HashMap<String, Action> = HashMap::new();
    let mut notifications = Vec::new();
    let mut changed_devices: Vec<String> = Vec::new();
    for command in commands {
        let mut action = command.action.clone();
        let device_id = action.device_id.clone();
        if !present.contains(&device_id) {
            outcomes.push(Err(StoreError::Backend(
                format!("a command for device {device_id}, which is not stored").into(),
            )));
            continue;
        }
        let waiting = queued.entry(device_id.clone()).or_default();
        let (superseded, direct) =
            rules::plan_queue(&mut action, waiting.clone(), command.online, now);
        for older in &superseded {
            waiting.retain(|a| a.action_id != older.action_id);
            // One queued earlier in this batch is inserted as it ends up.
            match inserted.iter_mut().find(|a| a.action_id == older.action_id) {
                Some(fresh) => *fresh = older.clone(),
                None => {
                    updated.insert(older.action_id.clone(), older.clone());
                }
            }
        }
        waiting.push(action.clone());
        inserted.push(action.clone());
        notifications.extend(command.notifications.iter().cloned());
        if let Some(reset) = &command.latest_reset
            && let Some(device) = devices.get_mut(&device_id)
        {
            device.security.latest_reset = Some(reset.clone());
            if !changed_devices.contains(&device_id) {
                changed_devices.push(device_id.clone());
            }
        }
        outcomes.push(Ok(Queued {
            action,
            superseded,
            direct,
        }));
    }
    let updated: Vec<Action> = updated.into_values().collect();
    let changed: Vec<(&str, &Device)> = changed_devices
        .iter()
        .filter_map(|id| devices.get(id).map(|d| (id.as_str(), d)))
        .collect();
    // Independent writes: one pipeline, one round trip.
    let c = tx.client();
    tokio::try_join!(
        insert_actions(c, &inserted),
        write_actions(c, &updated),
        insert_notifications(c, &notifications, false),
        write_devices(c, &changed),
    )?;
    Ok(outcomes)
}

/// Agents' reports in one transaction, durable soon: each applied to its
/// action in order, as if one after the other.
async fn report_batch(db: &Pooled, jobs: &[ReportJob]) -> R<Vec<StoreResult<Reported>>> {
    let tx = Pipelined::connect(db, Pipelined::BEGIN_SOON).await?;
    let outcomes = {
        let mut device_ids: Vec<&str> = jobs.iter().map(|j| j.device_id.as_str()).collect();
        device_ids.sort_unstable();
        device_ids.dedup();
        let action_ids: Vec<&str> = jobs.iter().map(|j| j.action_id.as_str()).collect();
        // One pipeline, executed in order: the actions are read once their
        // devices are locked.
        let params: [db::Param<'_>; 1] = [&device_ids];
        let action_params: [db::Param<'_>; 1] = [&action_ids];
        let (_, rows) = tx
            .begin_with_reads(
            (
                "SELECT device_id FROM devices WHERE device_id = ANY($1) ORDER BY device_id FOR UPDATE",
                &params,
            ),
            ("SELECT record FROM actions WHERE action_id = ANY($1)", &action_params),
        )
        .await?;
        let mut found = actions_keyed_by_id(&rows)?;
        let mut changed = HashSet::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            let outcome = match found.get_mut(&job.action_id) {
                None => Reported::Unknown,
                Some(action) if action.device_id != job.device_id => Reported::OtherDevice,
                Some(action) => {
                    let mut steps = Vec::new();
                    for report in &job.reports {
                        if rules::apply_report(action, report, job.now) {
                            steps.push(action.clone());
                        }
                    }
                    if !steps.is_empty() {
                        changed.insert(job.action_id.clone());
                    }
                    Reported::Applied(steps)
                }
            };
            outcomes.push(Ok(outcome));
        }
        let changed: Vec<Action> = found
            .into_values()
            .filter(|a| changed.contains(&a.action_id))
            .collect();
        write_actions(tx.client(), &changed).await?;
        outcomes
    };
    tx.commit().await?;
    Ok(outcomes)
}

#[async_trait]
impl CommandStore for PgStore {
    fn new_action_id(&self, _site_id: &str) -> String {
        uuid::Uuid::now_v7().to_string()
    }

    async fn queue_command(&self, command: NewCommand) -> StoreResult<Queued> {
        let (reply, answer) = oneshot::channel();
        match self.queue_batches.submit(QueueJob { command, reply }).await {
            Ok(()) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the store stopped before the command was stored".into(),
                ))
            }),
            Err(job) => queue_one(&self.db, job.command).await,
        }
    }

    async fn record_action(&self, action: &Action) -> StoreResult<()> {
        async {
            let client = self.client().await?;
            insert_action(&client, action, true).await
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn mark_sent(
        &self,
        device_id: &str,
        action_ids: &[String],
        now: Millis,
    ) -> StoreResult<Vec<Delivery>> {
        if action_ids.is_empty() || has_nul(device_id) {
            return Ok(action_ids.iter().map(|_| Delivery::Withdrawn).collect());
        }
        let ids: Vec<&str> = action_ids
            .iter()
            .map(String::as_str)
            .filter(|id| !has_nul(id))
            .collect();
        unit!(self, retry, |tx| {
            lock_device(&tx, device_id).await?;
            let mut found = actions_by_id(&tx, &ids).await?;
            let mut changed = HashSet::new();
            let mut outcomes = Vec::with_capacity(action_ids.len());
            for id in action_ids {
                let outcome = match found.get_mut(id) {
                    Some(action) if action.device_id == device_id => {
                        if rules::mark_sent(action, now) {
                            changed.insert(id.clone());
                            Delivery::First(Box::new(action.clone()))
                        } else if action.is_queued() {
                            Delivery::Again
                        } else {
                            Delivery::Withdrawn
                        }
                    }
                    // Unknown, or another device's: not for this stream.
                    _ => Delivery::Withdrawn,
                };
                outcomes.push(outcome);
            }
            let changed: Vec<Action> = found
                .into_values()
                .filter(|a| changed.contains(&a.action_id))
                .collect();
            write_actions(&tx, &changed).await?;
            outcomes
        })
    }

    async fn apply_reports(
        &self,
        device_id: &str,
        action_id: &str,
        reports: &[AgentReport],
        now: Millis,
    ) -> StoreResult<Reported> {
        if has_nul(action_id) || has_nul(device_id) {
            return Ok(Reported::Unknown);
        }
        let (reply, answer) = oneshot::channel();
        let job = ReportJob {
            device_id: device_id.to_owned(),
            action_id: action_id.to_owned(),
            reports: reports.to_vec(),
            now,
            reply,
        };
        match self.report_batches.submit(job).await {
            Ok(()) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the store stopped before the report was stored".into(),
                ))
            }),
            Err(job) => report_batch(&self.db, std::slice::from_ref(&job))
                .await
                .map_err(Fail::into_store)
                .and_then(|mut outcomes| outcomes.pop().expect("one job, one outcome")),
        }
    }

    async fn cancel_action(&self, action_id: &str, by: &str, now: Millis) -> StoreResult<Canceled> {
        if has_nul(action_id) {
            return Ok(Canceled::NotFound);
        }
        unit!(self, retry, |tx| {
            // An action's device never changes: read it to know which row to lock.
            let device_id = query_opt(
                &tx,
                "SELECT device_id FROM actions WHERE action_id = $1",
                &[&action_id],
            )
            .await?
            .map(|row| row.try_get::<_, String>(0))
            .transpose()?;
            let row = match device_id {
                None => None,
                Some(device_id) => {
                    lock_device(&tx, &device_id).await?;
                    query_opt(
                        &tx,
                        "SELECT record FROM actions WHERE action_id = $1",
                        &[&action_id],
                    )
                    .await?
                }
            };
            match row {
                None => Canceled::NotFound,
                Some(row) => {
                    let mut action: Action = record(&row)?;
                    match rules::cancel(&mut action, by, now) {
                        Err(status) => Canceled::Refused(status),
                        Ok(()) => {
                            write_actions(&tx, std::slice::from_ref(&action)).await?;
                            Canceled::Done(Box::new(action))
                        }
                    }
                }
            }
        })
    }

    async fn expire_due(&self, now: Millis) -> StoreResult<Vec<Action>> {
        unit!(self, retry, |tx| {
            let devices: Vec<String> = query(
                &tx,
                "SELECT DISTINCT device_id FROM open_actions WHERE expires_at <= $1",
                &[&now],
            )
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
            if devices.is_empty() {
                Vec::new()
            } else {
                // In id order, so that two sweeps cannot deadlock.
                query(
                    &tx,
                    "SELECT device_id FROM devices WHERE device_id = ANY($1)
                     ORDER BY device_id FOR UPDATE",
                    &[&devices],
                )
                .await?;
                let rows = query(
                    &tx,
                    "SELECT a.record FROM open_actions AS o JOIN actions AS a USING (action_id)
                     WHERE o.expires_at <= $1 AND o.device_id = ANY($2)
                     ORDER BY o.action_id",
                    &[&now, &devices],
                )
                .await?;
                let mut expired = Vec::new();
                for mut action in records::<Action>(&rows)? {
                    if rules::expire(&mut action, now) {
                        expired.push(action);
                    }
                }
                write_actions(&tx, &expired).await?;
                expired
            }
        })
    }

    async fn queued_actions(&self, device_id: &str) -> StoreResult<Vec<Action>> {
        if has_nul(device_id) {
            return Ok(Vec::new());
        }
        async {
            let client = self.client().await?;
            queued_of(&client, device_id).await
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn get_action(&self, action_id: &str) -> StoreResult<Option<Action>> {
        self.one_record(
            "SELECT record FROM actions WHERE action_id = $1",
            &[action_id],
        )
        .await
    }

    async fn list_actions(
        &self,
        filter: &ActionFilter,
        page_request: PageRequest<'_>,
    ) -> StoreResult<Page<Action>> {
        // A token of one device's list is not one of its site's.
        let device_scope = match &filter.device_id {
            Some(device_id) => format!("={device_id}"),
            None => "*".to_owned(),
        };
        let scope = [filter.site_id.as_str(), device_scope.as_str()];
        let after = db::after(page_request.token, "actions", &scope)?;
        async {
            let client = self.client().await?;
            let mut select = Select::new("SELECT record, action_id FROM actions WHERE TRUE");
            select.and("site_id = $", filter.site_id.clone());
            if let Some(device_id) = &filter.device_id {
                select.and("device_id = $", device_id.clone());
            }
            if let Some(after) = after {
                select.and("action_id < $", after);
            }
            if let Some(action_type) = filter.action_type {
                select.and("action_type = $", tag(&action_type));
            }
            if let Some(status) = filter.status {
                select.and("status = $", tag(&status));
            }
            if !filter.created_by.is_empty() {
                select.and("created_by = $", filter.created_by.clone());
            }
            if let Some(at) = filter.created_at_or_after {
                select.and("created_at >= $", at);
            }
            if let Some(at) = filter.created_before {
                select.and("created_at < $", at);
            }
            let rows = select
                .rows(&client, "action_id DESC", fetch_limit(page_request.limit))
                .await?;
            Ok(page(keyed(&rows)?, page_request.limit, "actions", &scope))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn device_has_action(
        &self,
        device_id: &str,
        kinds: &[ActionType],
        status: ActionStatus,
    ) -> StoreResult<bool> {
        if kinds.is_empty() || has_nul(device_id) {
            return Ok(false);
        }
        let kinds: Vec<String> = kinds.iter().map(tag).collect();
        async {
            let client = self.client().await?;
            let row = query_one(
                &client,
                "SELECT EXISTS (SELECT 1 FROM actions
                 WHERE device_id = $1 AND status = $2 AND action_type = ANY($3))",
                &[&device_id, &tag(&status), &kinds],
            )
            .await?;
            Ok(row.try_get::<_, bool>(0)?)
        }
        .await
        .map_err(Fail::into_store)
    }
}
