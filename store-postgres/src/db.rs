//! What every operation uses: errors, records as bytes, statements, tokens.

use deadpool_postgres::GenericClient;
use mdm_core::store::{Page, StoreError, StoreResult};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

pub(crate) type Param<'a> = &'a (dyn ToSql + Sync);

/// An operation's failure before it is told to the domain.
#[derive(Debug)]
pub(crate) enum Fail {
    Db(tokio_postgres::Error),
    Pool(deadpool_postgres::PoolError),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(error: tokio_postgres::Error) -> Self {
        Fail::Db(error)
    }
}

impl From<deadpool_postgres::PoolError> for Fail {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Fail::Pool(error)
    }
}

impl From<StoreError> for Fail {
    fn from(error: StoreError) -> Self {
        Fail::Store(error)
    }
}

/// Whether the server says the connection or the server itself is going
/// (or not there yet), so the call may work later.
pub(crate) fn is_transient(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code)
}

impl Fail {
    /// A conflict PostgreSQL resolved by aborting this transaction: running
    /// it again will most likely work.
    pub(crate) fn retryable(&self) -> bool {
        matches!(self, Fail::Db(e) if e.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        }))
    }

    pub(crate) fn into_store(self) -> StoreError {
        match self {
            Fail::Store(error) => error,
            Fail::Pool(deadpool_postgres::PoolError::Backend(error)) => {
                Fail::Db(error).into_store()
            }
            Fail::Pool(deadpool_postgres::PoolError::Timeout(_)) => {
                StoreError::Unavailable("no database connection became free in time".into())
            }
            Fail::Pool(deadpool_postgres::PoolError::Closed) => {
                StoreError::Unavailable("the store is closed".into())
            }
            Fail::Pool(error) => StoreError::Backend(Box::new(error)),
            Fail::Db(error) => match error.code() {
                Some(code) if *code == SqlState::DISK_FULL => StoreError::DiskFull,
                Some(code) if is_transient(code) => StoreError::Unavailable(error.to_string()),
                Some(_) => StoreError::Backend(Box::new(error)),
                // No SQLSTATE: the connection broke, timed out or never came up.
                None if error.is_closed()
                    || std::error::Error::source(&error)
                        .is_some_and(|s| s.is::<std::io::Error>())
                    || error.to_string().starts_with("timeout") =>
                {
                    StoreError::Unavailable(error.to_string())
                }
                None => StoreError::Backend(Box::new(error)),
            },
        }
    }
}

pub(crate) type R<T> = Result<T, Fail>;

pub(crate) fn encode<T: Serialize>(value: &T) -> R<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Fail::Store(StoreError::Backend(Box::new(e))))
}

/// The record in column 0 of `row`.
pub(crate) fn record<T: DeserializeOwned>(row: &Row) -> R<T> {
    record_at(row, 0)
}

/// The record in column `index` of `row`.
pub(crate) fn record_at<T: DeserializeOwned>(row: &Row, index: usize) -> R<T> {
    let bytes: &[u8] = row.try_get(index)?;
    serde_json::from_slice(bytes).map_err(|e| {
        Fail::Store(StoreError::Corrupt(format!(
            "a {} record: {e}",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("")
        )))
    })
}

pub(crate) fn records<T: DeserializeOwned>(rows: &[Row]) -> R<Vec<T>> {
    rows.iter().map(record).collect()
}

/// How a unit enum is spelled in the records, for its column.
pub(crate) fn tag<T: Serialize + std::fmt::Debug>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{value:?}"),
    }
}

/// PostgreSQL text cannot hold a NUL, so no row has a key with one; asking
/// would fail the query instead of finding nothing.
pub(crate) fn has_nul(key: &str) -> bool {
    key.contains('\0')
}

pub(crate) async fn query<C: GenericClient>(c: &C, sql: &str, params: &[Param<'_>]) -> R<Vec<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query(&statement, params).await?)
}

/// A transaction whose BEGIN goes out in one pipeline with its first two
/// reads ([`Pipelined::begin_with_reads`]): one round trip fewer per unit on
/// the busiest paths (the group commit's batches). Ended any other way than
/// by [`Pipelined::commit`] (an error, a dropped future), its connection is
/// closed instead of pooled: PostgreSQL rolls the transaction back, and no
/// later unit starts inside it.
pub(crate) struct Pipelined {
    client: Option<deadpool_postgres::Object>,
    begin: &'static str,
}

impl Pipelined {
    pub(crate) const BEGIN: &'static str = "BEGIN";
    /// Durable soon: the commit does not wait for the WAL flush.
    pub(crate) const BEGIN_SOON: &'static str = "BEGIN; SET LOCAL synchronous_commit = off";

    /// A connection for a transaction that `begin` (one of the constants
    /// above) will open.
    pub(crate) async fn connect(db: &crate::Pooled, begin: &'static str) -> R<Self> {
        Ok(Self {
            client: Some(db.client().await?),
            begin,
        })
    }

    pub(crate) fn client(&self) -> &deadpool_postgres::Object {
        self.client
            .as_ref()
            .expect("a pipelined transaction holds its connection until it ends")
    }

    /// Opens the transaction and runs two queries, all in one pipeline and
    /// in that order: the second starts (and takes its snapshot) only once
    /// the first has finished, so it sees what the first locked. Both are
    /// prepared first, so that neither is sent before the other is ready.
    pub(crate) async fn begin_with_reads(
        &self,
        first: (&str, &[Param<'_>]),
        second: (&str, &[Param<'_>]),
    ) -> R<(Vec<Row>, Vec<Row>)> {
        let c = self.client();
        let (one, two) = tokio::try_join!(c.prepare_cached(first.0), c.prepare_cached(second.0))?;
        let ((), rows_one, rows_two) = tokio::try_join!(
            c.batch_execute(self.begin),
            c.query(&one, first.1),
            c.query(&two, second.1)
        )?;
        Ok((rows_one, rows_two))
    }

    pub(crate) async fn commit(mut self) -> R<()> {
        self.client().batch_execute("COMMIT").await?;
        // Committed: the connection may serve the next unit.
        drop(self.client.take());
        Ok(())
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

pub(crate) async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[Param<'_>],
) -> R<Option<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&statement, params).await?)
}

pub(crate) async fn query_one<C: GenericClient>(c: &C, sql: &str, params: &[Param<'_>]) -> R<Row> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_one(&statement, params).await?)
}

pub(crate) async fn execute<C: GenericClient>(c: &C, sql: &str, params: &[Param<'_>]) -> R<u64> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.execute(&statement, params).await?)
}

/// Runs `$body` (which may use `?` and names the transaction `$tx`) in one
/// transaction on a pooled connection, and commits. With `retry`, a
/// transaction PostgreSQL aborted for a deadlock or a serialization
/// conflict runs once more; the body must then be safe to run twice.
macro_rules! unit {
    ($store:expr, retry, |$tx:ident| $body:block) => {
        $crate::db::retrying(|| async { $crate::db::unit!(@once $store, false, |$tx| $body) }).await
    };
    ($store:expr, soon, |$tx:ident| $body:block) => {
        $crate::db::unit!(@once $store, true, |$tx| $body).map_err($crate::db::Fail::into_store)
    };
    ($store:expr, |$tx:ident| $body:block) => {
        $crate::db::unit!(@once $store, false, |$tx| $body).map_err($crate::db::Fail::into_store)
    };
    (@once $store:expr, $soon:expr, |$tx:ident| $body:block) => {
        async {
            let mut client = $store.client().await?;
            let $tx = client.transaction().await?;
            if $soon {
                // Durable soon: the commit does not wait for the WAL flush.
                $tx.batch_execute("SET LOCAL synchronous_commit = off").await?;
            }
            let out = $body;
            $tx.commit().await?;
            Ok::<_, $crate::db::Fail>(out)
        }
        .await
    };
}
pub(crate) use unit;

/// Runs `attempt` once more when PostgreSQL aborted it for a deadlock or a
/// serialization conflict; the attempt must then be safe to run twice.
pub(crate) async fn retrying<T, F: Future<Output = R<T>>>(
    mut attempt: impl FnMut() -> F,
) -> StoreResult<T> {
    match attempt().await {
        Err(fail) if fail.retryable() => {
            tracing::debug!("transaction aborted by a conflict; running it again");
            attempt().await.map_err(Fail::into_store)
        }
        other => other.map_err(Fail::into_store),
    }
}

/// Page tokens: hex of the list's name, its scope and the last key given.
pub(crate) fn token(list: &str, scope: &[&str], key: &str) -> String {
    let mut text = String::from(list);
    for part in scope {
        text.push('\0');
        text.push_str(part);
    }
    text.push('\0');
    text.push_str(key);
    hex::encode(text)
}

/// The key a page starts after, None for the first page.
pub(crate) fn after(token: &str, list: &str, scope: &[&str]) -> Result<Option<String>, StoreError> {
    if token.is_empty() {
        return Ok(None);
    }
    let text = hex::decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or(StoreError::BadPageToken)?;
    let mut parts = text.splitn(scope.len() + 2, '\0');
    if parts.next() != Some(list) {
        return Err(StoreError::BadPageToken);
    }
    for expected in scope {
        if parts.next() != Some(*expected) {
            return Err(StoreError::BadPageToken);
        }
    }
    match parts.next() {
        Some(key) if !has_nul(key) => Ok(Some(key.to_owned())),
        _ => Err(StoreError::BadPageToken),
    }
}

/// A page from up to `limit + 1` rows, each `(item, key)`.
pub(crate) fn page<T>(
    mut rows: Vec<(T, String)>,
    limit: usize,
    list: &str,
    scope: &[&str],
) -> Page<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_page_token = match rows.last() {
        Some((_, key)) if more => token(list, scope, key),
        _ => String::new(),
    };
    Page {
        items: rows.into_iter().map(|(item, _)| item).collect(),
        next_page_token,
    }
}

/// `LIMIT` for a page of `limit` items: one more, to know whether another page follows.
pub(crate) fn fetch_limit(limit: usize) -> i64 {
    i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX)
}

/// A `SELECT` put together from the filters a listing was given.
pub(crate) struct Select {
    sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Select {
    /// `head` ends in a `WHERE` clause (`WHERE TRUE` when it has no condition).
    pub(crate) fn new(head: &str) -> Self {
        Self {
            sql: head.to_owned(),
            params: Vec::new(),
        }
    }

    /// Adds `AND <condition>`, whose `$` stands for the value's placeholder.
    pub(crate) fn and(&mut self, condition: &str, value: impl ToSql + Sync + Send + 'static) {
        self.params.push(Box::new(value));
        let placeholder = format!("${}", self.params.len());
        self.sql.push_str(" AND ");
        self.sql.push_str(&condition.replace('$', &placeholder));
    }

    pub(crate) async fn rows<C: GenericClient>(
        mut self,
        c: &C,
        order_by: &str,
        limit: i64,
    ) -> R<Vec<Row>> {
        self.params.push(Box::new(limit));
        self.sql.push_str(&format!(
            " ORDER BY {order_by} LIMIT ${}",
            self.params.len()
        ));
        let params: Vec<Param<'_>> = self
            .params
            .iter()
            .map(|p| p.as_ref() as Param<'_>)
            .collect();
        query(c, &self.sql, &params).await
    }
}

/// Rows of `(record, key)`: the records and the keys to page by.
pub(crate) fn keyed<T: DeserializeOwned>(rows: &[Row]) -> R<Vec<(T, String)>> {
    rows.iter()
        .map(|row| Ok((record(row)?, row.try_get::<_, String>(1)?)))
        .collect()
}
