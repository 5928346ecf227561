//! The store contract's conformance suite (`mdm-store-tests`) on the
//! embedded sled backend: each case on a new database in a temporary
//! directory, removed when the case ends.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use mdm_core::store::Store;
use mdm_store_sled::Storage;
use mdm_store_tests::StoreGuard;

/// The database's directory; a reopen opens it again (a restarted server).
struct Directory {
    path: PathBuf,
    _temp: tempfile::TempDir,
}

#[async_trait]
impl StoreGuard for Directory {
    async fn reopen(&self, store: Arc<dyn Store>) -> Option<Arc<dyn Store>> {
        store.close().await.unwrap();
        drop(store);
        // Waits for sled to let go of its file lock (a blocking wait).
        let path = self.path.clone();
        let reopened = tokio::task::spawn_blocking(move || Storage::open(&path))
            .await
            .unwrap()
            .unwrap();
        Some(Arc::new(reopened))
    }
}

async fn make_store() -> Option<(Arc<dyn Store>, Directory)> {
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("db");
    let storage = Storage::create(&path).unwrap();
    Some((Arc::new(storage), Directory { path, _temp: temp }))
}

mod sled {
    mdm_store_tests::store_conformance_suite!(super::make_store);
}
