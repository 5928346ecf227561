//! The company passcode: generation, keyed hashing, regenerate / disable,
//! and `verify_company_passcode`, the one place enrollment asks whether a
//! passcode is good, counts failures and locks a site out.
//!
//! Failures are counted by one background task
//! ([`FailedAttempts`](super::failed_attempts::FailedAttempts)), not
//! on the response path: counting writes and flushes only for an email that is
//! a user of some site, so a refusal that waited for it would tell a caller
//! by its time whether the email is known.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use rand::seq::IndexedRandom;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::Domain;
use crate::error::{Error, Result};
use crate::model::{
    CompanyPasscodeInfo, CompanyPasscodeRecord, PasscodeState, Site, User, now_millis,
};

pub const PASSCODE_LENGTH: usize = 12;
const DIGITS: &[u8] = b"0123456789";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A plaintext company passcode. Zeroized on drop; `Debug` hides it.
pub struct CompanyPasscode(Zeroizing<String>);

impl CompanyPasscode {
    /// 12 characters drawn uniformly from digits, lower- and upper-case
    /// letters by the OS CSPRNG, redrawn until every class is present (so
    /// the result is uniform over the valid passcodes).
    pub fn generate() -> Self {
        let alphabet: Vec<u8> = [DIGITS, LOWER, UPPER].concat();
        let mut rng = OsRng.unwrap_err();
        loop {
            let candidate: Zeroizing<String> = Zeroizing::new(
                (0..PASSCODE_LENGTH)
                    .map(|_| char::from(*alphabet.choose(&mut rng).expect("non-empty alphabet")))
                    .collect(),
            );
            let has = |class: &[u8]| candidate.bytes().any(|b| class.contains(&b));
            if has(DIGITS) && has(LOWER) && has(UPPER) {
                return Self(candidate);
            }
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for CompanyPasscode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompanyPasscode(<redacted>)")
    }
}

/// A passcode that verified: the site it belongs to and the enrolling user.
#[derive(Debug, Clone)]
pub struct VerifiedPasscode {
    pub site: Site,
    pub user: User,
}

/// Why a verification failed. Callers show the user one generic refusal;
/// this detail is for the log and the tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many failed attempts from {0}; try again later")]
    Throttled(IpAddr),
    #[error("the passcode matches no site")]
    WrongPasscode,
    #[error("the passcode of site {0} is disabled")]
    Disabled(String),
    #[error("the passcode of site {0} is locked out")]
    LockedOut(String),
    #[error("the email is not a user of site {0}")]
    NotAUser(String),
    #[error("the passcode is malformed")]
    Malformed,
}

impl Domain {
    fn passcode_hash(&self, passcode: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.passcode_key.as_slice())
            .expect("HMAC takes keys of any length");
        mac.update(passcode.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Generates a new passcode for the site, replacing the old one at once
    /// and resetting the failure count. The plaintext is returned once.
    pub async fn generate_company_passcode(
        &self,
        site_id: &str,
        admin_email: &str,
    ) -> Result<(CompanyPasscode, CompanyPasscodeInfo)> {
        let site = self.site(site_id).await?;
        // Failures of the old passcode must not be counted against the new one.
        self.failed_attempts.settled().await;
        let passcode = CompanyPasscode::generate();
        let previous = self.store.get_passcode(site_id).await?;
        let record = CompanyPasscodeRecord {
            site_id: site.site_id.clone(),
            state: PasscodeState::Enabled,
            hash: hex::encode(self.passcode_hash(passcode.expose())),
            generated_at: now_millis(),
            generated_by: admin_email.to_owned(),
            failed_attempts: 0,
            last_failed_at: None,
            last_used_at: None,
            enrollments: 0,
            failed_sources: Vec::new(),
            pending_lockout: None,
        };
        self.store.replace_passcode(&record).await?;
        tracing::info!(
            site_id,
            admin = admin_email,
            replaced = previous.is_some(),
            "company passcode generated"
        );
        Ok((passcode, CompanyPasscodeInfo::of(&site, Some(&record))))
    }

    /// The passcode's info, counting every failure refused before the call.
    pub async fn company_passcode_info(&self, site_id: &str) -> Result<CompanyPasscodeInfo> {
        self.failed_attempts.settled().await;
        let site = self.site(site_id).await?;
        let record = self.store.get_passcode(site_id).await?;
        Ok(CompanyPasscodeInfo::of(&site, record.as_ref()))
    }

    /// Turns self-service enrollment off until a new passcode is generated.
    pub async fn disable_company_passcode(
        &self,
        site_id: &str,
        admin_email: &str,
    ) -> Result<CompanyPasscodeInfo> {
        let site = self.site(site_id).await?;
        let record = self
            .store
            .update_passcode(
                site_id,
                Box::new(|record| {
                    let change = record.state == PasscodeState::Enabled;
                    if change {
                        record.state = PasscodeState::Disabled;
                    }
                    change
                }),
            )
            .await?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "site {site_id:?} has no company passcode to disable; generate one first"
                ))
            })?;
        tracing::info!(site_id, admin = admin_email, "company passcode disabled");
        Ok(CompanyPasscodeInfo::of(&site, Some(&record)))
    }

    /// Checks `passcode` for a user `email` coming from `source`.
    ///
    /// A wrong passcode given with the email of a user of a site counts as a
    /// failed attempt on that site; the attempt that reaches the site's limit
    /// locks the passcode out, records an alert and queues a notification to
    /// every admin of the site. A source that keeps failing is throttled.
    /// A refusal returns before its failure is counted (see the module doc);
    /// a success first waits for every failure refused before it.
    pub async fn verify_company_passcode(
        &self,
        email: &str,
        passcode: &str,
        source: IpAddr,
    ) -> Result<std::result::Result<VerifiedPasscode, Refusal>> {
        if !self.throttle.allows(source) {
            return Ok(Err(Refusal::Throttled(source)));
        }
        let email = email.trim().to_ascii_lowercase();
        let quiet = self.failed_attempts.quiet_mark();
        let refusal = match self.check_passcode(&email, passcode).await? {
            Ok(verified) if self.failed_attempts.quiet_since(quiet) => Ok(verified),
            Ok(_) => {
                // One of the failures still being counted may lock this site out.
                self.failed_attempts.settled().await;
                self.check_passcode(&email, passcode).await?
            }
            refusal => refusal,
        };
        let refusal = match refusal {
            // The enrollment that follows records the passcode's use
            // (`enroll_device`), in its own write.
            Ok(verified) => return Ok(Ok(verified)),
            Err(refusal) => refusal,
        };
        self.throttle.record_failure(source);
        let counts = refusal == Refusal::WrongPasscode || refusal == Refusal::Malformed;
        // Every refusal queues a job, counted or not, so each takes one path.
        self.failed_attempts
            .queue(counts.then_some(email), source)
            .await;
        Ok(Err(refusal))
    }

    /// Waits until every failure refused so far is counted and durable.
    pub async fn settle_failed_attempts(&self) {
        self.failed_attempts.settled().await;
    }

    async fn check_passcode(
        &self,
        email: &str,
        passcode: &str,
    ) -> Result<std::result::Result<VerifiedPasscode, Refusal>> {
        if passcode.len() != PASSCODE_LENGTH || !passcode.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Ok(Err(Refusal::Malformed));
        }
        let hash = self.passcode_hash(passcode);
        // The same two look-ups whether the passcode names a site or not, so
        // a refusal takes as long for a right passcode as for a wrong one.
        let site_id = self.store.site_for_passcode_hash(&hash).await?;
        let user = self
            .store
            .get_user(site_id.as_deref().unwrap_or_default(), email)
            .await?;
        let Some(site_id) = site_id else {
            return Ok(Err(Refusal::WrongPasscode));
        };
        let Some(user) = user else {
            return Ok(Err(Refusal::NotAUser(site_id)));
        };
        let Some(record) = self.store.get_passcode(&site_id).await? else {
            return Ok(Err(Refusal::WrongPasscode));
        };
        let stored = hex::decode(&record.hash).unwrap_or_default();
        if !bool::from(stored.as_slice().ct_eq(hash.as_slice())) {
            return Ok(Err(Refusal::WrongPasscode));
        }
        match record.state {
            PasscodeState::Enabled => {}
            PasscodeState::Disabled | PasscodeState::NotGenerated => {
                return Ok(Err(Refusal::Disabled(site_id)));
            }
            PasscodeState::LockedOut => return Ok(Err(Refusal::LockedOut(site_id))),
        }
        let site = self.site(&site_id).await?;
        Ok(Ok(VerifiedPasscode { site, user }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passcodes_have_the_right_shape_over_ten_thousand_generations() {
        let mut seen = std::collections::HashSet::new();
        let mut position_classes = [[0u32; 3]; PASSCODE_LENGTH];
        for _ in 0..10_000 {
            let passcode = CompanyPasscode::generate();
            let text = passcode.expose();
            assert_eq!(text.len(), PASSCODE_LENGTH);
            assert!(text.bytes().all(|b| b.is_ascii_alphanumeric()), "{text}");
            assert!(text.bytes().any(|b| b.is_ascii_digit()));
            assert!(text.bytes().any(|b| b.is_ascii_lowercase()));
            assert!(text.bytes().any(|b| b.is_ascii_uppercase()));
            for (i, b) in text.bytes().enumerate() {
                let class = if b.is_ascii_digit() {
                    0
                } else if b.is_ascii_lowercase() {
                    1
                } else {
                    2
                };
                position_classes[i][class] += 1;
            }
            assert!(seen.insert(text.to_owned()), "duplicate passcode");
        }
        // Every class shows up at every position: no fixed layout.
        for counts in position_classes {
            assert!(counts.iter().all(|&c| c > 500), "{counts:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_passcode() {
        let passcode = CompanyPasscode::generate();
        let debug = format!("{passcode:?}");
        assert!(!debug.contains(passcode.expose()));
    }
}
