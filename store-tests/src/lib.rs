#![forbid(unsafe_code)]
// Test code: a failed unwrap is a failed case, with its message.
#![allow(clippy::unwrap_used)]
//! The conformance suite of the store contract ([`mdm_core::store`]): one
//! set of cases, generic over the backend, that every backend runs.
//!
//! A backend's test file makes a fresh, empty store per case and invokes
//! [`store_conformance_suite!`] in a module named after the backend, so a
//! test is `sled::page_tokens_work_only_on_the_list_that_made_them`:
//!
//! ```ignore
//! async fn make_store() -> Option<(Arc<dyn Store>, MyGuard)> { ... }
//!
//! mod sled {
//!     mdm_store_tests::store_conformance_suite!(super::make_store);
//! }
//! ```
//!
//! `make_store` is any expression that can be called with no arguments
//! and returns a future of `Option<(Arc<dyn Store>, G)>` with
//! `G: StoreGuard`: None skips the case (no database to test against; the
//! factory says so). The guard keeps the store's backing (a temporary
//! directory, a test database) until the case ends, and can reopen it.
//! The calling crate needs `tokio` with its `macros` and `rt-multi-thread`
//! features: each case becomes a
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`.

use std::sync::Arc;

use async_trait::async_trait;
use mdm_core::store::Store;

pub mod cases;
pub mod fixtures;

/// What keeps a test store's data alive while a case runs (dropped after
/// it, also when it fails), and opens that data again.
#[async_trait]
pub trait StoreGuard: Send + Sync + 'static {
    /// Closes `store` ([`Store::close`]), lets go of it and opens the same
    /// data again, as a server restart would. The case gives up every
    /// handle it had first. None: this backend cannot, and the cases that
    /// need it are skipped.
    async fn reopen(&self, store: Arc<dyn Store>) -> Option<Arc<dyn Store>> {
        store.close().await.expect("close");
        None
    }
}

/// One `#[tokio::test]` per conformance case, each on a fresh store from
/// `$make_store` (see the crate docs).
#[macro_export]
macro_rules! store_conformance_suite {
    ($make_store:expr) => {
        $crate::store_conformance_suite!(@cases $make_store;
            // sites and users
            a_site_is_stored_once_and_read_back,
            a_site_change_is_kept_and_a_refused_one_is_not,
            whether_a_site_has_a_webhook_follows_every_write,
            concurrent_changes_of_a_site_do_not_undo_each_other,
            sites_list_in_id_order_filtered_and_paged,
            users_go_in_skipping_emails_the_site_has,
            an_email_twice_in_one_batch_is_stored_once,
            users_over_the_limit_are_refused_whole,
            users_are_found_by_email_and_id_and_listed_by_email,
            a_deleted_user_is_gone_from_every_lookup,
            // company passcodes
            a_replaced_passcode_stops_working_at_once,
            a_passcode_change_is_kept_and_a_refused_one_is_not,
            failed_attempts_count_in_order_and_the_one_at_the_limit_locks_out,
            forty_concurrent_wrong_passcodes_lock_out_exactly_once,
            // devices
            an_enrollment_stores_the_device_and_counts_on_the_passcode,
            a_proven_device_is_replaced_by_its_new_enrollment,
            a_claimed_serial_enrolls_alongside_the_active_device,
            a_serial_is_checked_against_every_active_device_of_the_site,
            a_device_change_is_kept_and_a_refused_one_is_not,
            devices_list_by_id_filtered_and_paged,
            the_audit_trail_lists_newest_first_up_to_the_limit,
            // commands and the action log
            a_command_goes_out_directly_only_when_online_and_nothing_waits,
            a_lock_or_reset_supersedes_pending_locks_and_resets_only,
            a_reset_stores_its_emails_and_the_latest_reset_with_it,
            mark_sent_sends_each_command_once_and_withdraws_the_rest,
            reports_move_a_command_along_in_order,
            only_commands_the_device_has_not_acknowledged_can_be_canceled,
            commands_expire_once_their_time_is_up_to_the_millisecond,
            queued_actions_are_a_devices_unfinished_commands_oldest_first,
            a_final_action_is_recorded_as_it_is,
            device_has_action_matches_kind_and_status,
            actions_list_newest_first_filtered_and_paged,
            // alerts and the outbox
            notifications_wait_in_the_outbox_until_delivered_oldest_first,
            notifications_list_by_site_and_state_oldest_first_in_pages,
            alerts_list_newest_first_and_one_stored_again_is_one,
            // page tokens
            page_tokens_work_only_on_the_list_that_made_them,
            // units that fail
            a_command_that_fails_stores_nothing,
            a_command_for_a_device_that_is_not_stored_is_refused,
            a_batch_of_users_that_fails_stores_none,
            an_enrollment_that_fails_stores_and_counts_nothing,
            // concurrency
            concurrent_locks_on_one_device_leave_exactly_one_pending,
            concurrent_commands_on_many_devices_keep_each_queue_its_own,
            concurrent_sweeps_expire_each_command_once,
            concurrent_enrollments_with_one_serial_see_each_other,
            concurrent_enrollments_each_count_on_the_passcode,
            concurrent_user_inserts_keep_the_limit_and_each_email_once;
            // through the guard
            reopen: everything_stored_is_there_after_a_reopen
        );
    };
    (@cases $make_store:expr; $($case:ident),+; reopen: $($reopen_case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((store, guard)) = ($make_store)().await else {
                    return;
                };
                $crate::cases::$case(store).await;
                drop(guard);
            }
        )+
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $reopen_case() {
                let Some((store, guard)) = ($make_store)().await else {
                    return;
                };
                $crate::cases::$reopen_case(store, &guard).await;
                drop(guard);
            }
        )+
    };
}

#[cfg(test)]
mod tests {
    /// Every `pub async fn` of `cases/` is in the macro's list, once.
    #[test]
    fn the_suite_runs_every_case() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let lib = std::fs::read_to_string(root.join("lib.rs")).unwrap();
        let list = &lib[lib.find("@cases $make_store;").unwrap()
            ..lib.find("(@cases $make_store:expr").unwrap()];
        let mut cases = Vec::new();
        for entry in std::fs::read_dir(root.join("cases")).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("pub async fn ") {
                    cases.push(rest.split('(').next().unwrap().to_owned());
                }
            }
        }
        assert!(cases.len() > 40, "{cases:?}");
        for case in &cases {
            let named = list
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|word| word == case)
                .count();
            assert_eq!(named, 1, "{case} is named {named} times in the suite");
        }
    }
}
