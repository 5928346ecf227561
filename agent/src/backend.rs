//! Platform backends: what this device can do, and how it does it. Each
//! backend reports its own capabilities; the server refuses up front what a
//! device cannot do.

use std::path::PathBuf;
use std::time::Duration;

use mdm_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A command as a backend sees it.
#[derive(Debug, Clone)]
pub enum Task {
    Lock { message: String },
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
}

fn capability(action: pb::ActionType, supported: bool, reason: &str) -> pb::DeviceCapability {
    pb::DeviceCapability {
        action: action.into(),
        supported,
        reason: reason.to_owned(),
    }
}

const NOT_YET: &str = "this agent version cannot do this on this platform yet";

/// The real operating system.
#[derive(Debug, Default)]
pub struct SystemBackend;

impl Backend for SystemBackend {
    fn name(&self) -> &'static str {
        "system"
    }
    fn capabilities(&self) -> Vec<pb::DeviceCapability> {
        vec![
            capability(pb::ActionType::Unenroll, true, ""),
            capability(pb::ActionType::Lock, false, NOT_YET),
            capability(pb::ActionType::ResetPasscode, false, NOT_YET),
        ]
    }
    fn apply(
        &self,
        _command_id: &str,
        _task: &Task,
        _step: &mut dyn FnMut(&str),
    ) -> Result<(), Failure> {
        Err(Failure {
            code: pb::FailureCode::Unsupported,
            message: NOT_YET.into(),
        })
    }
}

/// What the simulated device looks like, in `simulated.json`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimulatedDevice {
    pub locked: bool,
    pub lock_message: String,
    /// Every command applied, in order: tests check nothing is applied twice.
    pub applied: Vec<String>,
}

/// A device simulated in the state dir, for demos, tests and the benchmark.
/// `MDM_SIMULATED_DELAY_MS` slows each command down.
#[derive(Debug)]
pub struct SimulatedBackend {
    path: PathBuf,
    delay: Duration,
}

impl SimulatedBackend {
    pub fn new(state_dir: &std::path::Path) -> Self {
        let delay = std::env::var("MDM_SIMULATED_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        Self {
            path: state_dir.join("simulated.json"),
            delay,
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
        vec![
            capability(pb::ActionType::Unenroll, true, ""),
            capability(pb::ActionType::Lock, true, ""),
            capability(pb::ActionType::ResetPasscode, false, NOT_YET),
        ]
    }
    fn apply(
        &self,
        command_id: &str,
        task: &Task,
        step: &mut dyn FnMut(&str),
    ) -> Result<(), Failure> {
        std::thread::sleep(self.delay);
        let mut device = self.load();
        match task {
            Task::Lock { message } => {
                device.locked = true;
                device.lock_message = message.clone();
                device.applied.push(command_id.to_owned());
                self.save(&device)?;
                step("device locked");
            }
        }
        Ok(())
    }
}

/// The backend named on the command line.
pub fn by_name(name: &str, state_dir: &std::path::Path) -> Option<Box<dyn Backend>> {
    match name {
        "system" => Some(Box::new(SystemBackend)),
        "simulated" => Some(Box::new(SimulatedBackend::new(state_dir))),
        _ => None,
    }
}
