//! The users of a site: who may enroll devices there. Emails are unique
//! within a site, ignoring case (stored in lower case).

use std::collections::HashSet;

use super::Domain;
use crate::error::{Error, Result};
use crate::model::validate_email;
use crate::model::{User, now_millis, short_id};
use crate::store::{Page, PageRequest, UsersInserted};

/// Largest CSV import, in rows.
pub const MAX_IMPORT_ROWS: usize = 50_000;

/// A row of an import that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    /// 1-based line of the CSV text.
    pub line: u32,
    pub email: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: u32,
    pub errors: Vec<ImportError>,
}

pub fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_ascii_lowercase();
    validate_email(&email)
        .map_err(|reason| Error::InvalidArgument(format!("email {email:?} {reason}")))?;
    Ok(email)
}

fn normalize_display_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(
            "display_name must be at most 200 characters without control characters".into(),
        ));
    }
    Ok(name.to_owned())
}

impl Domain {
    pub async fn create_user(
        &self,
        site_id: &str,
        email: &str,
        display_name: &str,
    ) -> Result<User> {
        self.site(site_id).await?;
        let user = User {
            user_id: short_id("us"),
            site_id: site_id.to_owned(),
            email: normalize_email(email)?,
            display_name: normalize_display_name(display_name)?,
            created_at: now_millis(),
        };
        let inserted = self
            .store
            .insert_users(
                site_id,
                std::slice::from_ref(&user),
                self.max_users_per_site,
            )
            .await?;
        match inserted {
            UsersInserted::Inserted { existing } if existing.is_empty() => {}
            UsersInserted::Inserted { .. } => {
                return Err(Error::AlreadyExists(format!(
                    "site {site_id} already has a user {}",
                    user.email
                )));
            }
            UsersInserted::OverQuota { users } => {
                return Err(over_quota(site_id, users, 1, self.max_users_per_site));
            }
        }
        Ok(user)
    }

    pub async fn get_user_by_id(&self, user_id: &str) -> Result<User> {
        self.store
            .get_user_by_id(user_id)
            .await?
            .ok_or_else(|| Error::no_such("user", user_id))
    }

    pub async fn get_user(&self, site_id: &str, email: &str) -> Result<User> {
        self.site(site_id).await?;
        let email = normalize_email(email)?;
        self.store
            .get_user(site_id, &email)
            .await?
            .ok_or_else(|| Error::NotFound(format!("site {site_id} has no user {email}")))
    }

    pub async fn list_users(&self, site_id: &str, page: PageRequest<'_>) -> Result<Page<User>> {
        self.site(site_id).await?;
        Ok(self.store.list_users(site_id, page).await?)
    }

    pub async fn delete_user(&self, user_id: &str) -> Result<User> {
        self.store
            .delete_user(user_id)
            .await?
            .ok_or_else(|| Error::no_such("user", user_id))
    }

    /// Imports CSV text with the header `email,display_name`. Valid rows go
    /// in together, all or none (also across a crash or a full disk); each
    /// refused row is reported with its line and reason. Parsing and storing
    /// 50,000 rows takes a while: it runs on the blocking pool, so the
    /// runtime's workers keep serving other calls.
    pub async fn import_users(&self, site_id: &str, csv_text: &str) -> Result<ImportReport> {
        self.site(site_id).await?;
        let max_users = self.max_users_per_site;
        let (site, csv) = (site_id.to_owned(), csv_text.to_owned());
        let (users, mut errors) =
            match tokio::task::spawn_blocking(move || parse_users_csv(&site, &csv)).await {
                Ok(parsed) => parsed?,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(error) => {
                    return Err(Error::Unavailable(format!("the import stopped: {error}")));
                }
            };
        let rows: Vec<User> = users.iter().map(|(_, u)| u.clone()).collect();
        let inserted = self.store.insert_users(site_id, &rows, max_users).await?;
        let existing = match inserted {
            UsersInserted::Inserted { existing } => existing,
            UsersInserted::OverQuota { users: current } => {
                let new = users.len();
                return Err(over_quota(site_id, current, new, max_users));
            }
        };
        for index in &existing {
            let (line, user) = &users[*index];
            errors.push(ImportError {
                line: *line,
                email: user.email.clone(),
                reason: "the site already has this user".into(),
            });
        }
        errors.sort_by_key(|e| e.line);
        let imported = u32::try_from(users.len() - existing.len()).unwrap_or(u32::MAX);
        tracing::info!(site_id, imported, refused = errors.len(), "users imported");
        Ok(ImportReport { imported, errors })
    }
}

fn over_quota(site_id: &str, users: usize, adding: usize, limit: usize) -> Error {
    Error::ResourceExhausted(format!(
        "site {site_id} has {users} users and at most {limit} are allowed per site; \
         adding up to {adding} more would pass it, so nothing was stored: delete users first, \
         or ask the server's owner to raise --max-users-per-site"
    ))
}

/// Valid users with their line numbers, and the refused rows.
type ParsedCsv = (Vec<(u32, User)>, Vec<ImportError>);

/// Parses and validates the CSV.
pub fn parse_users_csv(site_id: &str, csv_text: &str) -> Result<ParsedCsv> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(csv_text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| Error::InvalidArgument(format!("csv line 1: {e}")))?
        .clone();
    let columns: Vec<String> = headers
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    let email_col = columns.iter().position(|c| c == "email");
    let name_col = columns.iter().position(|c| c == "display_name");
    let Some(email_col) = email_col else {
        return Err(Error::InvalidArgument(
            "csv line 1: the header must be \"email,display_name\"".into(),
        ));
    };
    let now = now_millis();
    let mut users = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut lines = LineCounter::new(csv_text);
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                let line = error.position().map_or(0, |p| lines.line_of(p.byte()));
                errors.push(ImportError {
                    line,
                    email: String::new(),
                    reason: format!("unreadable row: {error}"),
                });
                continue;
            }
        };
        // csv counts lines without the blank ones; count them from the byte offset.
        let line = record.position().map_or(0, |p| lines.line_of(p.byte()));
        if record.iter().all(str::is_empty) {
            continue;
        }
        if users.len() + errors.len() >= MAX_IMPORT_ROWS {
            return Err(Error::InvalidArgument(format!(
                "csv has more than {MAX_IMPORT_ROWS} rows; split it"
            )));
        }
        let raw_email = record.get(email_col).unwrap_or_default();
        let refuse = |reason: String| ImportError {
            line,
            email: raw_email.to_owned(),
            reason,
        };
        if record.len() != columns.len() {
            errors.push(refuse(format!(
                "has {} fields, the header has {}",
                record.len(),
                columns.len()
            )));
            continue;
        }
        let email = match normalize_email(raw_email) {
            Ok(email) => email,
            Err(error) => {
                errors.push(refuse(error.to_string()));
                continue;
            }
        };
        let display_name = match normalize_display_name(
            name_col.and_then(|c| record.get(c)).unwrap_or_default(),
        ) {
            Ok(name) => name,
            Err(error) => {
                errors.push(refuse(error.to_string()));
                continue;
            }
        };
        if !seen.insert(email.clone()) {
            errors.push(refuse("duplicate of an earlier row".into()));
            continue;
        }
        users.push((
            line,
            User {
                user_id: short_id("us"),
                site_id: site_id.to_owned(),
                email,
                display_name,
                created_at: now,
            },
        ));
    }
    Ok((users, errors))
}

/// Turns the byte offsets csv reports into 1-based line numbers. Offsets
/// only grow, so each newline is counted once over the whole import.
struct LineCounter<'a> {
    bytes: &'a [u8],
    scanned: usize,
    line: u32,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            bytes: text.as_bytes(),
            scanned: 0,
            line: 1,
        }
    }

    /// The line where the record starting at byte `offset` begins (csv
    /// puts a record's start before the blank lines it skipped).
    fn line_of(&mut self, offset: u64) -> u32 {
        let mut end = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        while end < self.bytes.len() && (self.bytes[end] == b'\n' || self.bytes[end] == b'\r') {
            end += 1;
        }
        if end > self.scanned {
            let newlines = self.bytes[self.scanned..end]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            self.line = self
                .line
                .saturating_add(u32::try_from(newlines).unwrap_or(u32::MAX));
            self.scanned = end;
        }
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_are_validated_with_their_line_numbers() {
        let csv = "email,display_name\nAlice@Example.com,Alice\nnot-an-email,Bob\n\ncarol@example.com,Carol,extra\nalice@example.com,Again\n\"dave@example.com\",\"Dave, Jr.\"\n";
        let (users, errors) = parse_users_csv("st_x", csv).expect("parsed");
        let emails: Vec<_> = users
            .iter()
            .map(|(line, u)| (*line, u.email.as_str(), u.display_name.as_str()))
            .collect();
        assert_eq!(
            emails,
            vec![
                (2, "alice@example.com", "Alice"),
                (7, "dave@example.com", "Dave, Jr.")
            ]
        );
        let refused: Vec<_> = errors.iter().map(|e| (e.line, e.email.as_str())).collect();
        assert_eq!(
            refused,
            vec![
                (3, "not-an-email"),
                (5, "carol@example.com"),
                (6, "alice@example.com")
            ]
        );
        assert!(errors[0].reason.contains("@"), "{}", errors[0].reason);
        assert!(errors[2].reason.contains("duplicate"));
    }

    #[test]
    fn a_csv_without_the_email_header_is_refused() {
        let error = parse_users_csv("st_x", "name\nalice\n").expect_err("refused");
        assert!(error.to_string().contains("header"), "{error}");
    }
}
