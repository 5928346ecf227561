//! `open_actions` lists exactly the actions not final yet (the rows with
//! `queued`): the store keeps it in step with every write of actions, and
//! the migration that made it filled it from the actions already stored.
//! Only PostgreSQL has it, so only here; the store's answers are the
//! conformance suite's.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::TestDb;
use mdm_core::model::{ActionStatus, ActionType};
use mdm_core::store::{CommandStore, Store};
use mdm_store_postgres::{MIGRATIONS, PgStore};
use mdm_store_tests::cases;
use mdm_store_tests::fixtures::{command, device};

/// The action ids `open_actions` lists, and those whose row says queued.
async fn open_and_queued(raw: &tokio_postgres::Client) -> (Vec<String>, Vec<String>) {
    let ids = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect();
    let open = raw
        .query("SELECT action_id FROM open_actions ORDER BY action_id", &[])
        .await
        .unwrap();
    let queued = raw
        .query(
            "SELECT action_id FROM actions WHERE queued ORDER BY action_id",
            &[],
        )
        .await
        .unwrap();
    (ids(open), ids(queued))
}

macro_rules! open_actions_follow {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let Some(db) = TestDb::new().await else {
                return;
            };
            let store: Arc<dyn Store> = Arc::new(db.store().await);
            cases::$case(store.clone()).await;
            let raw = db.raw().await;
            let (open, queued) = open_and_queued(&raw).await;
            let stored: i64 = raw
                .query_one("SELECT count(*) FROM actions", &[])
                .await
                .unwrap()
                .get(0);
            assert!(stored > 0, "the case stored no action");
            assert_eq!(open, queued, "open_actions is not the queued actions");
        }
    )*};
}

mod after {
    use super::*;

    open_actions_follow!(
        a_command_goes_out_directly_only_when_online_and_nothing_waits,
        a_lock_or_reset_supersedes_pending_locks_and_resets_only,
        mark_sent_sends_each_command_once_and_withdraws_the_rest,
        reports_move_a_command_along_in_order,
        only_commands_the_device_has_not_acknowledged_can_be_canceled,
        commands_expire_once_their_time_is_up_to_the_millisecond,
        a_final_action_is_recorded_as_it_is,
        concurrent_locks_on_one_device_leave_exactly_one_pending,
        concurrent_sweeps_expire_each_command_once,
        a_command_that_fails_stores_nothing,
    );
}

#[tokio::test]
async fn the_upgrade_to_schema_2_lists_the_queued_actions_already_stored() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    // A database at schema 1, with one command waiting and one done.
    let raw = db.raw().await;
    raw.batch_execute(
        "CREATE TABLE mdm_schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         INSERT INTO mdm_schema_migrations (version) VALUES (1);",
    )
    .await
    .unwrap();
    raw.batch_execute(MIGRATIONS[0]).await.unwrap();
    let probe = db.store().await;
    let phone = device("st_1", "dv_1", "SN1");
    let waiting = command(&probe, &phone, ActionType::Lock);
    let mut done = command(&probe, &phone, ActionType::Lock);
    done.status = ActionStatus::Succeeded;
    probe.close().await.unwrap();
    // That store migrated: start again from schema 1 by hand.
    raw.batch_execute(
        "DROP TABLE open_actions;
         DELETE FROM mdm_schema_migrations WHERE version > 1;
         CREATE INDEX actions_queued_by_device ON actions (device_id, action_id) WHERE queued;
         CREATE INDEX actions_queued_by_expiry ON actions (expires_at) WHERE queued;
         ALTER TABLE actions RESET (fillfactor);",
    )
    .await
    .unwrap();
    for action in [&waiting, &done] {
        raw.execute(
            "INSERT INTO actions (action_id, site_id, device_id, action_type, status, created_by,
                                  created_at, queued, expires_at, record)
             VALUES ($1, $2, $3, 'Lock', $4, $5, $6, $7, $8, $9)",
            &[
                &action.action_id,
                &action.site_id,
                &action.device_id,
                &format!("{:?}", action.status),
                &action.created_by,
                &action.created_at,
                &action.is_queued(),
                &action.expires_at,
                &serde_json::to_vec(action).unwrap(),
            ],
        )
        .await
        .unwrap();
    }

    let store = PgStore::connect(db.config(2)).await.unwrap();
    let (open, queued) = open_and_queued(&raw).await;
    assert_eq!(open, std::slice::from_ref(&waiting.action_id));
    assert_eq!(open, queued);
    let ids: Vec<String> = store
        .queued_actions("dv_1")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action_id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&waiting.action_id));
    let expired = store.expire_due(waiting.expires_at).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(open_and_queued(&raw).await, (Vec::new(), Vec::new()));
    let indexes: Vec<String> = raw
        .query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'actions' ORDER BY indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        ["actions_by_device", "actions_by_site", "actions_pkey"]
    );
    let options: Option<Vec<String>> = raw
        .query_one(
            "SELECT reloptions FROM pg_class WHERE relname = 'actions'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(options, Some(vec!["fillfactor=70".to_owned()]));
    store.close().await.unwrap();
}
