//! `mdm-server admin add | list | revoke`: manage admin credentials straight
//! in the data dir, so they work with or without a running server.

use std::io::Write;
use std::path::Path;

use time::{Duration, OffsetDateTime};

use crate::admins::Role;
use crate::config::AdminCommand;
use crate::datadir::{DataDir, DataDirError};
use crate::model::validate_email;

#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Registry(#[from] crate::admins::RegistryError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs one admin subcommand against `data_dir`, writing its report to `out`.
pub fn execute(
    data_dir: &Path,
    command: AdminCommand,
    out: &mut impl Write,
) -> Result<(), AdminCliError> {
    let dir = DataDir::new(data_dir);
    if dir.is_fresh()? {
        return Err(AdminCliError::Usage(format!(
            "{} has no data yet: start the server once with `mdm-server serve --data-dir {}`",
            data_dir.display(),
            data_dir.display()
        )));
    }
    dir.check_layout()?;
    match command {
        AdminCommand::Add {
            email,
            role,
            sites,
            out: out_dir,
            days,
        } => {
            let email = email.trim().to_ascii_lowercase();
            validate_email(&email)
                .map_err(|reason| AdminCliError::Usage(format!("--email {email:?} {reason}")))?;
            match (role, sites.is_empty()) {
                (Role::SiteAdmin, true) => {
                    return Err(AdminCliError::Usage(
                        "a site-admin needs at least one --site SITE_ID".into(),
                    ));
                }
                (Role::Owner, false) => {
                    return Err(AdminCliError::Usage(
                        "an owner manages every site; drop --site".into(),
                    ));
                }
                _ => {}
            }
            if let Some(bad) = sites.iter().find(|s| !is_plausible_id(s)) {
                return Err(AdminCliError::Usage(format!(
                    "--site {bad:?} is not a site id"
                )));
            }
            let ca = dir.load_ca()?;
            let record = dir.issue_admin_credential(
                &ca,
                &email,
                role,
                sites,
                Duration::days(i64::from(days)),
                &out_dir,
            )?;
            writeln!(
                out,
                "issued {} credential for {} (serial {}) into {}",
                record.role.as_str(),
                record.email,
                record.serial,
                out_dir.display()
            )?;
            writeln!(out, "use it with grpcurl:\n  {}", grpcurl_flags(&out_dir))?;
        }
        AdminCommand::List => {
            let records = dir.registry().list()?;
            writeln!(
                out,
                "{:<32} {:<10} {:<20} {:<11} {:<20} SERIAL",
                "EMAIL", "ROLE", "SITES", "STATE", "EXPIRES"
            )?;
            let now = OffsetDateTime::now_utc().unix_timestamp();
            for r in records {
                let state = match r.revoked_at {
                    Some(_) => "revoked",
                    None if r.expires_at < now => "expired",
                    None => "active",
                };
                let sites = if r.role == Role::Owner {
                    "*".to_owned()
                } else {
                    r.sites.join(",")
                };
                writeln!(
                    out,
                    "{:<32} {:<10} {:<20} {:<11} {:<20} {}",
                    r.email,
                    r.role.as_str(),
                    sites,
                    state,
                    format_unix(r.expires_at),
                    r.serial
                )?;
            }
        }
        AdminCommand::Grpcurl { credential } => {
            let dir = credential.unwrap_or_else(|| DataDir::new(data_dir).owner_credential());
            if !dir.join("admin.key").exists() {
                return Err(AdminCliError::Usage(format!(
                    "{} holds no admin credential",
                    dir.display()
                )));
            }
            writeln!(out, "{}", grpcurl_flags(&dir))?;
        }
        AdminCommand::Revoke { email } => {
            let email = email.trim().to_ascii_lowercase();
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let count = dir.registry().revoke(&email, now)?;
            if count == 0 {
                return Err(AdminCliError::Usage(format!(
                    "no active credential for {email}"
                )));
            }
            writeln!(
                out,
                "revoked {count} credential(s) of {email}; refused from the next call on"
            )?;
        }
    }
    Ok(())
}

/// The grpcurl TLS flags for a credential directory.
pub fn grpcurl_flags(dir: &Path) -> String {
    let d = dir.display();
    format!("grpcurl -cacert {d}/ca.crt -cert {d}/admin.crt -key {d}/admin.key")
}

fn is_plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn format_unix(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| seconds.to_string())
}
