//! Enrollment, devices and their audit trails.

use std::sync::Arc;

use mdm_core::model::{Device, DeviceStatus, Platform};
use mdm_core::store::{DeviceFilter, Enrolled, Store};

use crate::all_pages;
use crate::fixtures::{audit, device, first, ids, passcode, site};

async fn enroll(store: &Arc<dyn Store>, device: &mut Device, proven: Option<&str>) -> Enrolled {
    store.enroll_device(device, proven).await.unwrap()
}

async fn set_status(store: &Arc<dyn Store>, device_id: &str, status: DeviceStatus) {
    store
        .update_device(
            device_id,
            Box::new(move |d| {
                d.status = status;
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
}

/// An enrolled device is stored as given and counted on its site's
/// passcode record; a site without one enrolls without it.
pub async fn an_enrollment_stores_the_device_and_counts_on_the_passcode(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let mut phone = device("st_1", "dv_1", "SER1");
    assert_eq!(enroll(&store, &mut phone, None).await, Enrolled::New);
    assert_eq!(
        store.get_device("dv_1").await.unwrap().as_deref(),
        Some(&phone)
    );
    let record = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(record.enrollments, 1);
    assert!(record.last_used_at.is_some_and(|at| at > 0));
    let mut laptop = device("st_1", "dv_2", "SER2");
    enroll(&store, &mut laptop, None).await;
    assert_eq!(
        store
            .get_passcode("st_1")
            .await
            .unwrap()
            .unwrap()
            .enrollments,
        2
    );

    let mut elsewhere = device("st_2", "dv_3", "SER3");
    assert_eq!(enroll(&store, &mut elsewhere, None).await, Enrolled::New);
    assert!(store.get_device("dv_3").await.unwrap().is_some());
    assert_eq!(store.get_passcode("st_2").await.unwrap(), None);
    assert_eq!(store.get_device("dv_none").await.unwrap(), None);
    assert_eq!(store.get_device("nul\0").await.unwrap(), None);
}

/// The device a client proves to be (active, same site and serial) is
/// replaced by the new enrollment; a proof of anything else replaces
/// nothing, and a replaced device proves nothing any more.
pub async fn a_proven_device_is_replaced_by_its_new_enrollment(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let mut old = device("st_1", "dv_1", "SER1");
    enroll(&store, &mut old, None).await;
    let mut abroad = device("st_2", "dv_abroad", "SER1");
    enroll(&store, &mut abroad, None).await;

    // Proven, but another serial: no replacement.
    let mut other_serial = device("st_1", "dv_2", "SER2");
    assert_eq!(
        enroll(&store, &mut other_serial, Some("dv_1")).await,
        Enrolled::New
    );
    assert_eq!(other_serial.replaces_device_id, None);
    // Proven, same serial, another site's device: no replacement.
    let mut cross_site = device("st_2", "dv_3", "SER1");
    assert_eq!(
        enroll(&store, &mut cross_site, Some("dv_1")).await,
        Enrolled::AlongsideSameSerial("dv_abroad".into())
    );
    // A device that is not there proves nothing.
    let mut ghost_proof = device("st_1", "dv_4", "SER4");
    assert_eq!(
        enroll(&store, &mut ghost_proof, Some("dv_none")).await,
        Enrolled::New
    );
    assert_eq!(
        store.get_device("dv_1").await.unwrap().unwrap().status,
        DeviceStatus::Active
    );

    let mut replacement = device("st_1", "dv_7", "SER1");
    assert_eq!(
        enroll(&store, &mut replacement, Some("dv_1")).await,
        Enrolled::Replacing("dv_1".into())
    );
    assert_eq!(replacement.replaces_device_id.as_deref(), Some("dv_1"));
    assert_eq!(
        store.get_device("dv_7").await.unwrap().as_deref(),
        Some(&replacement)
    );
    let replaced = store.get_device("dv_1").await.unwrap().unwrap();
    assert_eq!(replaced.status, DeviceStatus::Replaced);
    assert_eq!(replaced.replaced_by_device_id.as_deref(), Some("dv_7"));

    // The replaced device proves nothing: the new one claims the serial
    // of an active device, and stays alongside it.
    let mut late = device("st_1", "dv_8", "SER1");
    assert_eq!(
        enroll(&store, &mut late, Some("dv_1")).await,
        Enrolled::AlongsideSameSerial("dv_7".into())
    );
    assert_eq!(late.replaces_device_id, None);
    assert_eq!(
        store.get_device("dv_7").await.unwrap().unwrap().status,
        DeviceStatus::Active
    );
    // An unenrolled device proves nothing either.
    let mut unenrolled = device("st_1", "dv_9", "SER9");
    enroll(&store, &mut unenrolled, None).await;
    set_status(&store, "dv_9", DeviceStatus::Unenrolled).await;
    let mut after = device("st_1", "dv_10", "SER9");
    assert_eq!(
        enroll(&store, &mut after, Some("dv_9")).await,
        Enrolled::New
    );
    assert_eq!(
        store.get_device("dv_9").await.unwrap().unwrap().status,
        DeviceStatus::Unenrolled
    );
}

/// A serial number alone proves nothing: the new device enrolls alongside
/// the active one that has it, and both stay active. Another site's
/// devices, inactive devices and blank serial numbers are no duplicates.
pub async fn a_claimed_serial_enrolls_alongside_the_active_device(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let mut first_device = device("st_1", "dv_1", "SER1");
    assert_eq!(enroll(&store, &mut first_device, None).await, Enrolled::New);
    let mut claimer = device("st_1", "dv_2", "SER1");
    assert_eq!(
        enroll(&store, &mut claimer, None).await,
        Enrolled::AlongsideSameSerial("dv_1".into())
    );
    for id in ["dv_1", "dv_2"] {
        assert_eq!(
            store.get_device(id).await.unwrap().unwrap().status,
            DeviceStatus::Active
        );
    }
    let mut elsewhere = device("st_2", "dv_3", "SER1");
    assert_eq!(enroll(&store, &mut elsewhere, None).await, Enrolled::New);
    let mut blank_a = device("st_1", "dv_5", "");
    let mut blank_b = device("st_1", "dv_6", "");
    assert_eq!(enroll(&store, &mut blank_a, None).await, Enrolled::New);
    assert_eq!(enroll(&store, &mut blank_b, None).await, Enrolled::New);
    // Serial numbers are compared exactly.
    let mut lower = device("st_1", "dv_7", "ser1");
    assert_eq!(enroll(&store, &mut lower, None).await, Enrolled::New);

    let mut gone = device("st_1", "dv_8", "SER8");
    enroll(&store, &mut gone, None).await;
    set_status(&store, "dv_8", DeviceStatus::Unenrolled).await;
    let mut back = device("st_1", "dv_9", "SER8");
    assert_eq!(enroll(&store, &mut back, None).await, Enrolled::New);
}

/// The check for a serial number covers every active device of the site,
/// not only the last one enrolled with it: A active, B enrolled alongside,
/// B unenrolled, then C names A. Of several active ones, the one enrolled
/// last is named.
pub async fn a_serial_is_checked_against_every_active_device_of_the_site(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let enrolled = |id: &str, at: i64| {
        let mut d = device("st_1", id, "SER");
        d.enrolled_at = at;
        d
    };
    let mut a = enrolled("dv_a", 1_000);
    assert_eq!(enroll(&store, &mut a, None).await, Enrolled::New);
    let mut b = enrolled("dv_b", 2_000);
    assert_eq!(
        enroll(&store, &mut b, None).await,
        Enrolled::AlongsideSameSerial("dv_a".into())
    );
    set_status(&store, "dv_b", DeviceStatus::Unenrolled).await;
    let mut c = enrolled("dv_c", 3_000);
    assert_eq!(
        enroll(&store, &mut c, None).await,
        Enrolled::AlongsideSameSerial("dv_a".into())
    );
    // A and C are active: C, enrolled last, is named.
    let mut d = enrolled("dv_d", 4_000);
    assert_eq!(
        enroll(&store, &mut d, None).await,
        Enrolled::AlongsideSameSerial("dv_c".into())
    );
    // C goes and E replaces D (proven): F then names E, enrolled after A.
    set_status(&store, "dv_c", DeviceStatus::Unenrolled).await;
    let mut e = enrolled("dv_e", 5_000);
    assert_eq!(
        enroll(&store, &mut e, Some("dv_d")).await,
        Enrolled::Replacing("dv_d".into())
    );
    let mut f = enrolled("dv_f", 6_000);
    assert_eq!(
        enroll(&store, &mut f, None).await,
        Enrolled::AlongsideSameSerial("dv_e".into())
    );
    // None of them active: a new device is new.
    for id in ["dv_a", "dv_e", "dv_f"] {
        set_status(&store, id, DeviceStatus::Unenrolled).await;
    }
    let mut g = enrolled("dv_g", 7_000);
    assert_eq!(enroll(&store, &mut g, None).await, Enrolled::New);
}

/// Changes are stored (also those durable soon) and returned; one that
/// returns false is not stored; a device that is not there is None.
pub async fn a_device_change_is_kept_and_a_refused_one_is_not(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let mut phone = device("st_1", "dv_1", "S1");
    enroll(&store, &mut phone, None).await;
    let seen = store
        .update_device_soon(
            "dv_1",
            Box::new(|d| {
                d.last_seen = Some(42);
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.last_seen, Some(42));
    assert_eq!(
        store.get_device("dv_1").await.unwrap().as_deref(),
        Some(&seen)
    );
    let moved = store
        .update_device(
            "dv_1",
            Box::new(|d| {
                d.user_email = "b@example.com".into();
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(moved.last_seen, Some(42));
    assert_eq!(moved.user_email, "b@example.com");
    assert_eq!(
        store.get_device("dv_1").await.unwrap().as_deref(),
        Some(&moved)
    );
    for soon in [false, true] {
        let change: mdm_core::store::Change<'_, Device> = Box::new(|d| {
            d.user_email = "not written".into();
            false
        });
        if soon {
            store.update_device_soon("dv_1", change).await.unwrap();
        } else {
            store.update_device("dv_1", change).await.unwrap();
        }
        assert_eq!(
            store.get_device("dv_1").await.unwrap().as_deref(),
            Some(&moved)
        );
    }
    assert!(
        store
            .update_device("dv_none", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .update_device_soon("dv_none", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get_device("dv_none").await.unwrap().is_none());
}

/// A site's devices list by id, in pages, filtered by platform, status
/// and user, also when the filter leaves gaps between pages.
pub async fn devices_list_by_id_filtered_and_paged(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    for (id, platform, email) in [
        ("dv_c", Platform::Linux, "a@example.com"),
        ("dv_a", Platform::Windows, "b@example.com"),
        ("dv_e", Platform::Windows, "a@example.com"),
        ("dv_b", Platform::Linux, "b@example.com"),
        ("dv_d", Platform::Linux, "a@example.com"),
        ("dv_f", Platform::Linux, "c@example.com"),
    ] {
        let mut d = device("st_1", id, id);
        d.facts.platform = platform;
        d.user_email = email.into();
        enroll(&store, &mut d, None).await;
    }
    let mut elsewhere = device("st_2", "dv_0", "x");
    enroll(&store, &mut elsewhere, None).await;
    set_status(&store, "dv_d", DeviceStatus::Unenrolled).await;

    let all = DeviceFilter::default();
    let page = store.list_devices("st_1", &all, first(4)).await.unwrap();
    assert_eq!(
        ids(&page.items, |d| &d.device_id),
        ["dv_a", "dv_b", "dv_c", "dv_d"]
    );
    assert_eq!(page.items[3].status, DeviceStatus::Unenrolled);
    let listed = all_pages!(4, |page| store.list_devices("st_1", &all, page));
    assert_eq!(
        ids(&listed, |d| &d.device_id),
        ["dv_a", "dv_b", "dv_c", "dv_d", "dv_e", "dv_f"]
    );

    let linux_active = DeviceFilter {
        platform: Some(Platform::Linux),
        status: Some(DeviceStatus::Active),
        user_email: String::new(),
    };
    for limit in [1, 2, 10] {
        let listed = all_pages!(limit, |page| store.list_devices(
            "st_1",
            &linux_active,
            page
        ));
        assert_eq!(ids(&listed, |d| &d.device_id), ["dv_b", "dv_c", "dv_f"]);
    }
    let of_a = DeviceFilter {
        user_email: "a@example.com".into(),
        ..DeviceFilter::default()
    };
    let listed = all_pages!(1, |page| store.list_devices("st_1", &of_a, page));
    assert_eq!(ids(&listed, |d| &d.device_id), ["dv_c", "dv_d", "dv_e"]);
    let unenrolled = DeviceFilter {
        status: Some(DeviceStatus::Unenrolled),
        ..DeviceFilter::default()
    };
    let listed = all_pages!(1, |page| store.list_devices("st_1", &unenrolled, page));
    assert_eq!(ids(&listed, |d| &d.device_id), ["dv_d"]);
    let windows_of_b = DeviceFilter {
        platform: Some(Platform::Windows),
        status: None,
        user_email: "b@example.com".into(),
    };
    let listed = all_pages!(1, |page| store.list_devices("st_1", &windows_of_b, page));
    assert_eq!(ids(&listed, |d| &d.device_id), ["dv_a"]);
    let nobody = DeviceFilter {
        user_email: "nobody@example.com".into(),
        ..DeviceFilter::default()
    };
    let page = store
        .list_devices("st_1", &nobody, first(10))
        .await
        .unwrap();
    assert!(page.items.is_empty() && page.next_page_token.is_empty());
    let listed = all_pages!(10, |page| store.list_devices("st_2", &all, page));
    assert_eq!(ids(&listed, |d| &d.device_id), ["dv_0"]);
    assert!(
        store
            .list_devices("st_none", &all, first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// The audit trail lists newest first, at most `limit` entries, per device.
pub async fn the_audit_trail_lists_newest_first_up_to_the_limit(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let mut a = device("st_1", "dv_a", "A");
    let mut b = device("st_1", "dv_b", "B");
    enroll(&store, &mut a, None).await;
    enroll(&store, &mut b, None).await;
    let entries: Vec<_> = ["enrolled", "locked", "unlocked", "renamed"]
        .iter()
        .map(|what| audit(what))
        .collect();
    for entry in &entries {
        store.append_audit("dv_a", entry).await.unwrap();
    }
    store.append_audit("dv_b", &audit("other")).await.unwrap();
    assert_eq!(
        store.list_audit("dv_a", 2).await.unwrap(),
        [entries[3].clone(), entries[2].clone()]
    );
    let whole: Vec<_> = entries.iter().rev().cloned().collect();
    assert_eq!(store.list_audit("dv_a", 10).await.unwrap(), whole);
    assert!(store.list_audit("dv_a", 0).await.unwrap().is_empty());
    let other: Vec<_> = store
        .list_audit("dv_b", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.what)
        .collect();
    assert_eq!(other, ["other"]);
    assert!(store.list_audit("dv_none", 10).await.unwrap().is_empty());
}
