//! Alerts and the outbox of notifications.

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use mdm_core::model::{Alert, Notification, NotificationState};
use mdm_core::store::{OutboxStore, Page, PageRequest, StoreResult};

use crate::PgStore;
use crate::db::{
    self, Fail, R, Select, encode, fetch_limit, keyed, page, query, records, tag, unit,
};

/// Stores an alert; with `upsert`, one with its id already there is
/// replaced, else that fails the unit.
pub(crate) async fn insert_alert<C: GenericClient>(c: &C, alert: &Alert, upsert: bool) -> R<()> {
    let sql = if upsert {
        "INSERT INTO alerts (site_id, alert_id, record) VALUES ($1, $2, $3)
         ON CONFLICT (site_id, alert_id) DO UPDATE SET record = EXCLUDED.record"
    } else {
        "INSERT INTO alerts (site_id, alert_id, record) VALUES ($1, $2, $3)"
    };
    db::execute(c, sql, &[&alert.site_id, &alert.alert_id, &encode(alert)?]).await?;
    Ok(())
}

/// Stores notifications in one statement; with `upsert`, those whose id
/// is there already are replaced, else any such fails the unit.
pub(crate) async fn insert_notifications<C: GenericClient>(
    c: &C,
    notifications: &[Notification],
    upsert: bool,
) -> R<()> {
    if notifications.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = notifications
        .iter()
        .map(|n| n.notification_id.as_str())
        .collect();
    let sites: Vec<&str> = notifications.iter().map(|n| n.site_id.as_str()).collect();
    let states: Vec<String> = notifications.iter().map(|n| tag(&n.state)).collect();
    let rows = notifications.iter().map(encode).collect::<R<Vec<_>>>()?;
    let sql = if upsert {
        "INSERT INTO outbox (notification_id, site_id, state, record)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
         ON CONFLICT (notification_id) DO UPDATE
         SET site_id = EXCLUDED.site_id, state = EXCLUDED.state, record = EXCLUDED.record"
    } else {
        "INSERT INTO outbox (notification_id, site_id, state, record)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
    };
    db::execute(c, sql, &[&ids, &sites, &states, &rows]).await?;
    Ok(())
}

#[async_trait]
impl OutboxStore for PgStore {
    async fn put_alert(&self, alert: &Alert, notifications: &[Notification]) -> StoreResult<()> {
        unit!(self, retry, |tx| {
            insert_alert(&tx, alert, true).await?;
            insert_notifications(&tx, notifications, true).await?;
        })
    }

    async fn put_notification(&self, notification: &Notification) -> StoreResult<()> {
        async {
            let client = self.client().await?;
            insert_notifications(&client, std::slice::from_ref(notification), true).await
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn pending_notifications(&self) -> StoreResult<Vec<Notification>> {
        async {
            let client = self.client().await?;
            let rows = query(
                &client,
                "SELECT record FROM outbox WHERE state = 'Pending' ORDER BY notification_id",
                &[],
            )
            .await?;
            records(&rows)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn list_alerts(
        &self,
        site_id: &str,
        page_request: PageRequest<'_>,
    ) -> StoreResult<Page<Alert>> {
        let after = db::after(page_request.token, "alerts", &[site_id])?;
        async {
            let client = self.client().await?;
            let mut select = Select::new("SELECT record, alert_id FROM alerts WHERE TRUE");
            select.and("site_id = $", site_id.to_owned());
            if let Some(after) = after {
                select.and("alert_id < $", after);
            }
            let rows = select
                .rows(&client, "alert_id DESC", fetch_limit(page_request.limit))
                .await?;
            Ok(page(
                keyed(&rows)?,
                page_request.limit,
                "alerts",
                &[site_id],
            ))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn list_notifications(
        &self,
        site_id: Option<&str>,
        state: Option<NotificationState>,
        page_request: PageRequest<'_>,
    ) -> StoreResult<Page<Notification>> {
        // A token of one site's list is not one of all sites'.
        let scope = match site_id {
            Some(site_id) => format!("={site_id}"),
            None => "*".to_owned(),
        };
        let after = db::after(page_request.token, "notifications", &[&scope])?;
        async {
            let client = self.client().await?;
            let mut select = Select::new("SELECT record, notification_id FROM outbox WHERE TRUE");
            if let Some(site_id) = site_id {
                select.and("site_id = $", site_id.to_owned());
            }
            if let Some(state) = state {
                select.and("state = $", tag(&state));
            }
            if let Some(after) = after {
                select.and("notification_id > $", after);
            }
            let rows = select
                .rows(&client, "notification_id", fetch_limit(page_request.limit))
                .await?;
            Ok(page(
                keyed(&rows)?,
                page_request.limit,
                "notifications",
                &[&scope],
            ))
        }
        .await
        .map_err(Fail::into_store)
    }
}
