//! `UserService.ImportUsers`: the CSV text an admin uploads, through the
//! parser and per-row validation. Every accepted row must be a valid,
//! normalized, unique user with a line number inside the text.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use mdm_core::model::validate_email;
use mdm_core::domain::users::parse_users_csv;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok((users, errors)) = parse_users_csv("st_fuzz", &text) else {
        return;
    };
    let lines = u32::try_from(text.matches('\n').count())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    let mut seen = HashSet::new();
    for (line, user) in &users {
        assert!((1..=lines).contains(line), "line {line} of {lines}");
        assert!(validate_email(&user.email).is_ok(), "{:?}", user.email);
        assert_eq!(user.email, user.email.to_ascii_lowercase());
        assert!(user.display_name.chars().count() <= 200);
        assert!(
            seen.insert(user.email.clone()),
            "duplicate {:?}",
            user.email
        );
    }
    for error in &errors {
        assert!(error.line <= lines, "line {} of {lines}", error.line);
    }
});
