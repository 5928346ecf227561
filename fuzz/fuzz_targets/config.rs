//! The server's TOML config file: parsed, merged with empty flags and
//! defaults, and validated as `mdm-server serve --config FILE` does; plus
//! the duration and email parsers on the raw text. What validation accepts
//! must be usable: certificate lifetimes that fit a date, heartbeat
//! intervals that the stream's timers can double and schedule.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mdm_server::config::{self, ServeArgs};

/// A real CA certificate, so an `[smtp]` section is checked with one; the
/// flag wins over `[smtp] ca_file`, so the fuzzer cannot make us read files.
fn smtp_ca() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let (ca, _) = mdm_server::pki::CertificateAuthority::generate("mdm fuzz smtp CA")
            .expect("a CA can be generated");
        // One file, replaced atomically, so runs leave nothing behind.
        let path = std::env::temp_dir().join("mdm-fuzz-smtp-ca.pem");
        let partial = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&partial, ca.cert_pem()).expect("the CA file can be written");
        std::fs::rename(&partial, &path).expect("the CA file can be renamed");
        path
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(duration) = config::parse_duration(&text) {
        assert!(!duration.is_zero());
    }
    let _ = mdm_core::model::validate_email(&text);
    let Ok(file) = config::parse_file_config(&text, "fuzz.toml") else {
        return;
    };
    let args = ServeArgs {
        smtp_ca: Some(smtp_ca()),
        ..ServeArgs::default()
    };
    let Ok(config) = config::resolve_with_file(None, &args, file) else {
        return;
    };
    // What the server does with them: `now + lifetime` for each device
    // certificate, `interval * 2` and timers on every agent stream.
    let lifetime = time::Duration::milliseconds(
        i64::try_from(config.device_cert_lifetime.as_millis()).unwrap_or(i64::MAX),
    );
    assert!(
        time::OffsetDateTime::now_utc()
            .checked_add(lifetime)
            .is_some(),
        "device_cert_lifetime {:?} overflows a certificate date",
        config.device_cert_lifetime
    );
    let twice = config
        .heartbeat_interval
        .checked_mul(2)
        .expect("the heartbeat interval can be doubled");
    assert!(
        std::time::Instant::now().checked_add(twice).is_some(),
        "heartbeat_interval {:?} overflows a timer",
        config.heartbeat_interval
    );
});
