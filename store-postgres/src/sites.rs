//! Sites, users and company passcodes.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use mdm_core::model::{CompanyPasscodeRecord, Site, User};
use mdm_core::rules;
use mdm_core::store::{
    Change, FailedAttempt, FailedAttemptEntry, LockoutAlert, Page, PageRequest, SiteFilter,
    SiteStore, StoreError, StoreResult, UsersInserted,
};

use crate::PgStore;
use crate::db::{
    self, Fail, R, Select, encode, fetch_limit, has_nul, keyed, page, query, query_one, query_opt,
    record, records, unit,
};

/// First key of the transaction-scoped advisory locks that serialise
/// inserting a site's users (the second is a hash of the site id).
const USERS_LOCK: i32 = 0x6d64_7501;

pub(crate) fn passcode_hash(record: &CompanyPasscodeRecord) -> R<Vec<u8>> {
    hex::decode(&record.hash).map_err(|e| {
        Fail::Store(StoreError::Corrupt(format!(
            "the passcode hash of site {} is not hex: {e}",
            record.site_id
        )))
    })
}

async fn write_passcode<C: deadpool_postgres::GenericClient>(
    c: &C,
    record: &CompanyPasscodeRecord,
) -> R<()> {
    db::execute(
        c,
        "UPDATE passcodes SET hash = $2, record = $3 WHERE site_id = $1",
        &[&record.site_id, &passcode_hash(record)?, &encode(record)?],
    )
    .await?;
    Ok(())
}

#[async_trait]
impl SiteStore for PgStore {
    async fn insert_site(&self, site: &Site) -> StoreResult<bool> {
        unit!(self, |tx| {
            db::execute(
                &tx,
                "INSERT INTO sites (site_id, has_webhook, record) VALUES ($1, $2, $3)
                 ON CONFLICT (site_id) DO NOTHING",
                &[&site.site_id, &site.webhook.is_some(), &encode(site)?],
            )
            .await?
                == 1
        })
    }

    async fn get_site(&self, site_id: &str) -> StoreResult<Option<Site>> {
        self.one_record("SELECT record FROM sites WHERE site_id = $1", &[site_id])
            .await
    }

    async fn update_site(
        &self,
        site_id: &str,
        change: Change<'_, Site>,
    ) -> StoreResult<Option<Site>> {
        if has_nul(site_id) {
            return Ok(None);
        }
        unit!(self, |tx| {
            let row = query_opt(
                &tx,
                "SELECT record FROM sites WHERE site_id = $1 FOR UPDATE",
                &[&site_id],
            )
            .await?;
            match row {
                None => None,
                Some(row) => {
                    let mut site: Site = record(&row)?;
                    if change(&mut site) {
                        db::execute(
                            &tx,
                            "UPDATE sites SET has_webhook = $2, record = $3 WHERE site_id = $1",
                            &[&site_id, &site.webhook.is_some(), &encode(&site)?],
                        )
                        .await?;
                    }
                    Some(site)
                }
            }
        })
    }

    async fn list_sites(
        &self,
        filter: &SiteFilter,
        page_request: PageRequest<'_>,
    ) -> StoreResult<Page<Site>> {
        let after = db::after(page_request.token, "sites", &[])?;
        async {
            let client = self.client().await?;
            let mut select = Select::new("SELECT record, site_id FROM sites WHERE TRUE");
            if let Some(after) = after {
                select.and("site_id > $", after);
            }
            if let Some(only) = &filter.only {
                select.and("site_id = ANY($)", only.clone());
            }
            let rows = select
                .rows(&client, "site_id", fetch_limit(page_request.limit))
                .await?;
            Ok(page(keyed(&rows)?, page_request.limit, "sites", &[]))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn site_has_webhook(&self, site_id: &str) -> StoreResult<bool> {
        if has_nul(site_id) {
            return Ok(false);
        }
        async {
            let client = self.client().await?;
            let row = query_opt(
                &client,
                "SELECT has_webhook FROM sites WHERE site_id = $1",
                &[&site_id],
            )
            .await?;
            Ok(match row {
                Some(row) => row.try_get::<_, bool>(0)?,
                None => false,
            })
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn insert_users(
        &self,
        site_id: &str,
        users: &[User],
        max_users: usize,
    ) -> StoreResult<UsersInserted> {
        unit!(self, retry, |tx| {
            db::execute(
                &tx,
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&USERS_LOCK, &site_id],
            )
            .await?;
            let emails: Vec<&str> = users.iter().map(|u| u.email.as_str()).collect();
            let taken: HashSet<String> = query(
                &tx,
                "SELECT email FROM users WHERE site_id = $1 AND email = ANY($2)",
                &[&site_id, &emails],
            )
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
            let mut existing = Vec::new();
            let mut new: Vec<&User> = Vec::new();
            let mut seen = HashSet::new();
            for (index, user) in users.iter().enumerate() {
                // A second row of the batch with the same email is as taken
                // as one already stored.
                if taken.contains(&user.email) || !seen.insert(user.email.as_str()) {
                    existing.push(index);
                } else {
                    new.push(user);
                }
            }
            let count: i64 = query_one(
                &tx,
                "SELECT count(*) FROM users WHERE site_id = $1",
                &[&site_id],
            )
            .await?
            .try_get(0)?;
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            if count.saturating_add(new.len()) > max_users {
                UsersInserted::OverQuota { users: count }
            } else {
                if !new.is_empty() {
                    let ids: Vec<&str> = new.iter().map(|u| u.user_id.as_str()).collect();
                    let emails: Vec<&str> = new.iter().map(|u| u.email.as_str()).collect();
                    let rows = new.iter().map(|u| encode(*u)).collect::<R<Vec<_>>>()?;
                    db::execute(
                        &tx,
                        "INSERT INTO users (user_id, site_id, email, record)
                         SELECT id, $2::text, email, record
                         FROM unnest($1::text[], $3::text[], $4::bytea[]) AS u(id, email, record)",
                        &[&ids, &site_id, &emails, &rows],
                    )
                    .await?;
                }
                UsersInserted::Inserted { existing }
            }
        })
    }

    async fn get_user(&self, site_id: &str, email: &str) -> StoreResult<Option<User>> {
        self.one_record(
            "SELECT record FROM users WHERE site_id = $1 AND email = $2",
            &[site_id, email],
        )
        .await
    }

    async fn get_user_by_id(&self, user_id: &str) -> StoreResult<Option<User>> {
        self.one_record("SELECT record FROM users WHERE user_id = $1", &[user_id])
            .await
    }

    async fn list_users(
        &self,
        site_id: &str,
        page_request: PageRequest<'_>,
    ) -> StoreResult<Page<User>> {
        let after = db::after(page_request.token, "users", &[site_id])?;
        async {
            let client = self.client().await?;
            let mut select = Select::new("SELECT record, email FROM users WHERE TRUE");
            select.and("site_id = $", site_id.to_owned());
            if let Some(after) = after {
                select.and("email > $", after);
            }
            let rows = select
                .rows(&client, "email", fetch_limit(page_request.limit))
                .await?;
            Ok(page(keyed(&rows)?, page_request.limit, "users", &[site_id]))
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn delete_user(&self, user_id: &str) -> StoreResult<Option<User>> {
        if has_nul(user_id) {
            return Ok(None);
        }
        unit!(self, |tx| {
            query_opt(
                &tx,
                "DELETE FROM users WHERE user_id = $1 RETURNING record",
                &[&user_id],
            )
            .await?
            .map(|row| record(&row))
            .transpose()?
        })
    }

    async fn sites_of_email(&self, email: &str) -> StoreResult<Vec<String>> {
        if has_nul(email) {
            return Ok(Vec::new());
        }
        async {
            let client = self.client().await?;
            let rows = query(
                &client,
                "SELECT site_id FROM users WHERE email = $1 ORDER BY site_id",
                &[&email],
            )
            .await?;
            Ok(rows
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn get_passcode(&self, site_id: &str) -> StoreResult<Option<CompanyPasscodeRecord>> {
        self.one_record(
            "SELECT record FROM passcodes WHERE site_id = $1",
            &[site_id],
        )
        .await
    }

    async fn replace_passcode(&self, passcode: &CompanyPasscodeRecord) -> StoreResult<()> {
        unit!(self, |tx| {
            db::execute(
                &tx,
                "INSERT INTO passcodes (site_id, hash, record) VALUES ($1, $2, $3)
                 ON CONFLICT (site_id) DO UPDATE SET hash = EXCLUDED.hash, record = EXCLUDED.record",
                &[&passcode.site_id, &passcode_hash(passcode)?, &encode(passcode)?],
            )
            .await?;
        })
    }

    async fn update_passcode(
        &self,
        site_id: &str,
        change: Change<'_, CompanyPasscodeRecord>,
    ) -> StoreResult<Option<CompanyPasscodeRecord>> {
        if has_nul(site_id) {
            return Ok(None);
        }
        unit!(self, |tx| {
            let row = query_opt(
                &tx,
                "SELECT record FROM passcodes WHERE site_id = $1 FOR UPDATE",
                &[&site_id],
            )
            .await?;
            match row {
                None => None,
                Some(row) => {
                    let mut passcode: CompanyPasscodeRecord = record(&row)?;
                    if change(&mut passcode) {
                        write_passcode(&tx, &passcode).await?;
                    }
                    Some(passcode)
                }
            }
        })
    }

    async fn site_for_passcode_hash(&self, hash: &[u8]) -> StoreResult<Option<String>> {
        async {
            let client = self.client().await?;
            Ok(query_opt(
                &client,
                "SELECT site_id FROM passcodes WHERE hash = $1",
                &[&hash],
            )
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
        }
        .await
        .map_err(Fail::into_store)
    }

    async fn record_failed_attempts(
        &self,
        attempts: &[FailedAttemptEntry],
        lockout: LockoutAlert<'_>,
    ) -> StoreResult<Vec<FailedAttempt>> {
        if attempts.is_empty() {
            return Ok(Vec::new());
        }
        let mut site_ids: Vec<&str> = attempts.iter().map(|a| a.site.site_id.as_str()).collect();
        site_ids.sort_unstable();
        site_ids.dedup();
        unit!(self, retry, |tx| {
            // Locked in one statement, in id order, so that two batches
            // naming the same sites cannot deadlock.
            let rows = query(
                &tx,
                "SELECT record FROM passcodes WHERE site_id = ANY($1) ORDER BY site_id FOR UPDATE",
                &[&site_ids],
            )
            .await?;
            let mut passcodes: BTreeMap<String, (CompanyPasscodeRecord, bool)> =
                records::<CompanyPasscodeRecord>(&rows)?
                    .into_iter()
                    .map(|r| (r.site_id.clone(), (r, false)))
                    .collect();
            let mut outcomes = Vec::with_capacity(attempts.len());
            let mut alerts = Vec::new();
            let mut notifications = Vec::new();
            for attempt in attempts {
                let Some((passcode, changed)) = passcodes.get_mut(&attempt.site.site_id) else {
                    outcomes.push(FailedAttempt::NotEnabled);
                    continue;
                };
                let outcome = match rules::count_failed_attempt(
                    passcode,
                    attempt.site.failed_attempt_limit,
                    attempt.at,
                    &attempt.source,
                ) {
                    None => FailedAttempt::NotEnabled,
                    Some(false) => FailedAttempt::Counted {
                        failed_attempts: passcode.failed_attempts,
                    },
                    Some(true) => {
                        let (alert, sent) = lockout(&attempt.site, passcode);
                        notifications.extend(sent);
                        alerts.push(alert.clone());
                        FailedAttempt::LockedOut(Box::new(alert))
                    }
                };
                *changed |= !matches!(outcome, FailedAttempt::NotEnabled);
                outcomes.push(outcome);
            }
            for (passcode, changed) in passcodes.values() {
                if *changed {
                    write_passcode(&tx, passcode).await?;
                }
            }
            for alert in &alerts {
                crate::outbox::insert_alert(&tx, alert, false).await?;
            }
            crate::outbox::insert_notifications(&tx, &notifications, false).await?;
            outcomes
        })
    }
}
