//! The store contract's conformance suite (`mdm-store-tests`) on
//! PostgreSQL: each case on a database of its own on the server
//! `MDM_TEST_DATABASE_URL` names, dropped when the case ends. Without that
//! server each case says it is skipped, except in CI (`CI=true`), where
//! that fails it.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::TestDb;
use mdm_core::store::Store;
use mdm_store_postgres::PgStore;
use mdm_store_tests::StoreGuard;

/// Connections per store: the concurrent cases run up to forty calls at once.
const POOL_SIZE: usize = 20;

/// The test database; a reopen is a new store (a restarted server) on it.
struct Database(TestDb);

#[async_trait]
impl StoreGuard for Database {
    async fn reopen(&self, store: Arc<dyn Store>) -> Option<Arc<dyn Store>> {
        store.close().await.unwrap();
        drop(store);
        let reopened = PgStore::connect(self.0.config(POOL_SIZE)).await.unwrap();
        Some(Arc::new(reopened))
    }
}

async fn make_store() -> Option<(Arc<dyn Store>, Database)> {
    let db = TestDb::new().await?;
    let store = PgStore::connect(db.config(POOL_SIZE)).await.unwrap();
    Some((Arc::new(store), Database(db)))
}

mod postgres {
    mdm_store_tests::store_conformance_suite!(super::make_store);
}
