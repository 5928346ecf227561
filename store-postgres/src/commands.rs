//! Commands and the action log.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use mdm_core::model::{Action, ActionStatus, ActionType, Millis, now_millis};
use mdm_core::rules::{self, AgentReport};
use mdm_core::store::{
    ActionFilter, Canceled, CommandStore, Delivery, NewCommand, Page, PageRequest, Queued,
    Reported, StoreError, StoreResult,
};

use crate::PgStore;
use crate::db::{
    self, Fail, R, Select, encode, fetch_limit, has_nul, keyed, page, query, query_one, query_opt,
    record, records, tag, unit,
};
use crate::devices::{lock_device, write_device};
use crate::outbox::insert_notifications;

async fn insert_action<C: GenericClient>(c: &C, action: &Action, upsert: bool) -> R<()> {
    let sql = if upsert {
        "INSERT INTO actions (action_id, site_id, device_id, action_type, status, created_by,
                              created_at, queued, expires_at, record)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (action_id) DO UPDATE SET site_id = EXCLUDED.site_id,
             device_id = EXCLUDED.device_id, action_type = EXCLUDED.action_type,
             status = EXCLUDED.status, created_by = EXCLUDED.created_by,
             created_at = EXCLUDED.created_at, queued = EXCLUDED.queued,
             expires_at = EXCLUDED.expires_at, record = EXCLUDED.record"
    } else {
        "INSERT INTO actions (action_id, site_id, device_id, action_type, status, created_by,
                              created_at, queued, expires_at, record)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    };
    db::execute(
        c,
        sql,
        &[
            &action.action_id,
            &action.site_id,
            &action.device_id,
            &tag(&action.action_type),
            &tag(&action.status),
            &action.created_by,
            &action.created_at,
            &action.is_queued(),
            &action.expires_at,
            &encode(action)?,
        ],
    )
    .await?;
    Ok(())
}

/// Writes changed actions (their ids, devices and kinds never change) in
/// one statement.
async fn write_actions<C: GenericClient>(c: &C, actions: &[Action]) -> R<()> {
    if actions.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = actions.iter().map(|a| a.action_id.as_str()).collect();
    let statuses: Vec<String> = actions.iter().map(|a| tag(&a.status)).collect();
    let queued: Vec<bool> = actions.iter().map(Action::is_queued).collect();
    let expires: Vec<Millis> = actions.iter().map(|a| a.expires_at).collect();
    let rows = actions.iter().map(encode).collect::<R<Vec<_>>>()?;
    db::execute(
        c,
        "UPDATE actions AS a
         SET status = u.status, queued = u.queued, expires_at = u.expires_at, record = u.record
         FROM unnest($1::text[], $2::text[], $3::bool[], $4::bigint[], $5::bytea[])
             AS u(action_id, status, queued, expires_at, record)
         WHERE a.action_id = u.action_id",
        &[&ids, &statuses, &queued, &expires, &rows],
    )
    .await?;
    Ok(())
}

async fn queued_of<C: GenericClient>(c: &C, device_id: &str) -> R<Vec<Action>> {
    let rows = query(
        c,
        "SELECT record FROM actions WHERE device_id = $1 AND queued ORDER BY action_id",
        &[&device_id],
    )
    .await?;
    let actions: Vec<Action> = records(&rows)?;
    Ok(actions.into_iter().filter(Action::is_queued).collect())
}

#[async_trait]
impl CommandStore for PgStore {
    fn new_action_id(&self, _site_id: &str) -> String {
        uuid::Uuid::now_v7().to_string()
    }

    async fn queue_command(&self, command: NewCommand) -> StoreResult<Queued> {
        let NewCommand {
            action,
            online,
            notifications,
            latest_reset,
        } = command;
        unit!(self, retry, |tx| {
            let mut action = action.clone();
            let device_id = action.device_id.clone();
            let Some(mut device) = lock_device(&tx, &device_id).await? else {
                return Err(Fail::Store(StoreError::Backend(
                    format!("a command for device {device_id}, which is not stored").into(),
                )));
            };
            let queued = queued_of(&tx, &device_id).await?;
            let (superseded, direct) = rules::plan_queue(&mut action, queued, online, now_millis());
            insert_action(&tx, &action, false).await?;
            write_actions(&tx, &superseded).await?;
            insert_notifications(&tx, &notifications, false).await?;
            if let Some(reset) = &latest_reset {
                device.security.latest_reset = Some(reset.clone());
                write_device(&tx, &device_id, &device).await?;
            }
            Queued {
                action,
                superseded,
                direct,
            }
        })
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
            let rows = query(
                &tx,
                "SELECT record FROM actions WHERE action_id = ANY($1)",
                &[&ids],
            )
            .await?;
            let mut found: HashMap<String, Action> = records::<Action>(&rows)?
                .into_iter()
                .map(|a| (a.action_id.clone(), a))
                .collect();
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
        unit!(self, soon, |tx| {
            lock_device(&tx, device_id).await?;
            let row = query_opt(
                &tx,
                "SELECT record FROM actions WHERE action_id = $1",
                &[&action_id],
            )
            .await?;
            match row {
                None => Reported::Unknown,
                Some(row) => {
                    let mut action: Action = record(&row)?;
                    if action.device_id != device_id {
                        Reported::OtherDevice
                    } else {
                        let mut steps = Vec::new();
                        for report in reports {
                            if rules::apply_report(&mut action, report, now) {
                                steps.push(action.clone());
                            }
                        }
                        if !steps.is_empty() {
                            write_actions(&tx, std::slice::from_ref(&action)).await?;
                        }
                        Reported::Applied(steps)
                    }
                }
            }
        })
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
                "SELECT DISTINCT device_id FROM actions WHERE queued AND expires_at <= $1",
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
                    "SELECT record FROM actions
                     WHERE queued AND expires_at <= $1 AND device_id = ANY($2)
                     ORDER BY action_id",
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
        if has_nul(action_id) {
            return Ok(None);
        }
        async {
            let client = self.client().await?;
            query_opt(
                &client,
                "SELECT record FROM actions WHERE action_id = $1",
                &[&action_id],
            )
            .await?
            .map(|row| record(&row))
            .transpose()
        }
        .await
        .map_err(Fail::into_store)
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
