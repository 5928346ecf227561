//! Platform backends: what this device can do, and how it does it. Each
//! backend reports its own capabilities; the server refuses up front what a
//! device cannot do. The real OS lives in `system`; this file has the trait
//! and the simulated device.

use std::path::PathBuf;
use std::time::Duration;

use mdm_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A command as a backend sees it. `Debug` never shows the passcode.
#[derive(Clone)]
pub enum Task {
    Lock {
        message: String,
    },
    ResetPasscode {
        passcode: zeroize::Zeroizing<String>,
        message: String,
    },
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Task::Lock { message } => f.debug_struct("Lock").field("message", message).finish(),
            Task::ResetPasscode { message, .. } => f
                .debug_struct("ResetPasscode")
                .field("passcode", &"<redacted>")
                .field("message", message)
                .finish(),
        }
    }
}

/// Why a backend could not do it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: pb::FailureCode,
    pub message: String,
}

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn capabilities(&self) -> Vec<pb::DeviceCapability>;
    /// Carries out `task`, calling `step` after each completed step.
    fn apply(
        &self,
        command_id: &str,
        task: &Task,
        step: &mut dyn FnMut(&str),
    ) -> Result<(), Failure>;
    /// Whether the device's passcode meets `policy`; None when it cannot tell.
    fn compliance(&self, policy: &pb::PasscodePolicy) -> Option<pb::PasscodeCompliance>;
}

pub(crate) fn capability(
    action: pb::ActionType,
    supported: bool,
    reason: &str,
) -> pb::DeviceCapability {
    pb::DeviceCapability {
        action: action.into(),
        supported,
        reason: reason.to_owned(),
    }
}

/// What the simulated device looks like, in `simulated.json`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimulatedDevice {
    pub locked: bool,
    pub lock_message: String,
    /// The device passcode. A simulation: a real device never stores it.
    #[serde(default)]
    pub passcode: String,
    /// Unix milliseconds when the passcode was set.
    #[serde(default)]
    pub passcode_set_at: i64,
    /// Every command applied, in order: tests check nothing is applied twice.
    pub applied: Vec<String>,
}

/// A device simulated in the state dir, for demos, tests and the benchmark.
/// Environment knobs: `MDM_SIMULATED_DELAY_MS` slows each command down;
/// `MDM_SIMULATED_UNSUPPORTED=lock,reset_passcode` withdraws capabilities;
/// `MDM_SIMULATED_FAIL=permission|policy|unsupported|internal` makes commands fail.
#[derive(Debug)]
pub struct SimulatedBackend {
    path: PathBuf,
    delay: Duration,
    unsupported: Vec<String>,
    fail: Option<pb::FailureCode>,
}

impl SimulatedBackend {
    pub fn new(state_dir: &std::path::Path) -> Self {
        let delay = std::env::var("MDM_SIMULATED_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        let unsupported = std::env::var("MDM_SIMULATED_UNSUPPORTED")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        let fail = std::env::var("MDM_SIMULATED_FAIL")
            .ok()
            .map(|v| match v.as_str() {
                "permission" => pb::FailureCode::Permission,
                "policy" => pb::FailureCode::Policy,
                "unsupported" => pb::FailureCode::Unsupported,
                _ => pb::FailureCode::Internal,
            });
        Self {
            path: state_dir.join("simulated.json"),
            delay,
            unsupported,
            fail,
        }
    }

    pub fn load(&self) -> SimulatedDevice {
        std::fs::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self, device: &SimulatedDevice) -> Result<(), Failure> {
        let internal = |e: std::io::Error| Failure {
            code: pb::FailureCode::Internal,
            message: format!("cannot save the simulated device: {e}"),
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(internal)?;
        }
        let json =
            serde_json::to_vec_pretty(device).map_err(|e| internal(std::io::Error::other(e)))?;
        crate::state::write_atomic(&self.path, &json, true).map_err(internal)
    }
}

impl Backend for SimulatedBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn capabilities(&self) -> Vec<pb::DeviceCapability> {
        let reason = "not supported by this simulated device (MDM_SIMULATED_UNSUPPORTED)";
        let entry = |action, name: &str| {
            let ok = !self.unsupported.iter().any(|u| u == name);
            capability(action, ok, if ok { "" } else { reason })
        };
        vec![
            capability(pb::ActionType::Unenroll, true, ""),
            entry(pb::ActionType::Lock, "lock"),
            entry(pb::ActionType::ResetPasscode, "reset_passcode"),
        ]
    }

    fn apply(
        &self,
        command_id: &str,
        task: &Task,
        step: &mut dyn FnMut(&str),
    ) -> Result<(), Failure> {
        std::thread::sleep(self.delay);
        if let Some(code) = self.fail {
            return Err(Failure {
                code,
                message: "the simulated device refused (MDM_SIMULATED_FAIL)".into(),
            });
        }
        let mut device = self.load();
        device.applied.push(command_id.to_owned());
        match task {
            Task::Lock { message } => {
                device.locked = true;
                device.lock_message = message.clone();
                self.save(&device)?;
                step("device locked");
            }
            Task::ResetPasscode { passcode, message } => {
                device.passcode = passcode.as_str().to_owned();
                device.passcode_set_at = now_millis();
                self.save(&device)?;
                step("passcode set");
                device.locked = true;
                device.lock_message = message.clone();
                self.save(&device)?;
                step("device locked");
            }
        }
        Ok(())
    }

    fn compliance(&self, policy: &pb::PasscodePolicy) -> Option<pb::PasscodeCompliance> {
        let device = self.load();
        Some(evaluate(&device.passcode, device.passcode_set_at, policy))
    }
}

fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Whether `passcode`, set at `set_at` (Unix ms), meets `policy`.
pub fn evaluate(
    passcode: &str,
    set_at: i64,
    policy: &pb::PasscodePolicy,
) -> pb::PasscodeCompliance {
    let has_passcode = !passcode.is_empty();
    let length = u32::try_from(passcode.chars().count()).unwrap_or(u32::MAX);
    let digit = passcode.chars().any(|c| c.is_ascii_digit());
    let lower = passcode.chars().any(|c| c.is_ascii_lowercase());
    let upper = passcode.chars().any(|c| c.is_ascii_uppercase());
    let symbol = passcode.chars().any(|c| !c.is_ascii_alphanumeric());
    let age_days = (now_millis() - set_at) / 86_400_000;
    let reason = if !has_passcode {
        policy.required.then(|| "no passcode is set".to_owned())
    } else if length < policy.min_length {
        Some(format!("shorter than {} characters", policy.min_length))
    } else if policy.complexity() == pb::PasscodeComplexity::Alphanumeric
        && !(digit && (lower || upper))
    {
        Some("needs letters and digits".to_owned())
    } else if policy.complexity() == pb::PasscodeComplexity::Complex
        && !(digit && lower && upper && symbol)
    {
        Some("needs lower- and upper-case letters, digits and a symbol".to_owned())
    } else if policy.max_age_days > 0 && age_days > i64::from(policy.max_age_days) {
        Some(format!("older than {} days", policy.max_age_days))
    } else {
        None
    };
    pb::PasscodeCompliance {
        has_passcode,
        meets_policy: reason.is_none(),
        reason: reason.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min_length: u32, complexity: pb::PasscodeComplexity) -> pb::PasscodePolicy {
        pb::PasscodePolicy {
            required: true,
            min_length,
            complexity: complexity.into(),
            max_age_days: 0,
        }
    }

    #[test]
    fn compliance_follows_the_policy() {
        let now = now_millis();
        assert!(!evaluate("", now, &policy(4, pb::PasscodeComplexity::Numeric)).meets_policy);
        assert!(
            evaluate("12345678", now, &policy(8, pb::PasscodeComplexity::Numeric)).meets_policy
        );
        assert!(!evaluate("1234", now, &policy(8, pb::PasscodeComplexity::Numeric)).meets_policy);
        assert!(
            !evaluate(
                "12345678",
                now,
                &policy(8, pb::PasscodeComplexity::Alphanumeric)
            )
            .meets_policy
        );
        assert!(
            evaluate(
                "abc12345",
                now,
                &policy(8, pb::PasscodeComplexity::Alphanumeric)
            )
            .meets_policy
        );
        assert!(
            evaluate("aB3!efgh", now, &policy(8, pb::PasscodeComplexity::Complex)).meets_policy
        );
        let mut old = policy(4, pb::PasscodeComplexity::Numeric);
        old.max_age_days = 1;
        assert!(!evaluate("1234", now - 3 * 86_400_000, &old).meets_policy);
    }
}
