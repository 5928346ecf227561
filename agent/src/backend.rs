//! Platform backends: what this device can do, and (with the reset/lock
//! feature) how it does it. Each backend reports its own capabilities.

use mdm_proto::v1 as pb;

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn capabilities(&self) -> Vec<pb::DeviceCapability>;
}

fn capability(action: pb::ActionType, supported: bool, reason: &str) -> pb::DeviceCapability {
    pb::DeviceCapability {
        action: action.into(),
        supported,
        reason: reason.to_owned(),
    }
}

/// What every backend can do today: remove itself when unenrolled.
fn base_capabilities(reason: &str) -> Vec<pb::DeviceCapability> {
    vec![
        capability(pb::ActionType::Unenroll, true, ""),
        capability(pb::ActionType::Lock, false, reason),
        capability(pb::ActionType::ResetPasscode, false, reason),
    ]
}

const NOT_YET: &str = "this agent version cannot lock or reset passcodes yet";

/// The real operating system.
#[derive(Debug, Default)]
pub struct SystemBackend;

impl Backend for SystemBackend {
    fn name(&self) -> &'static str {
        "system"
    }
    fn capabilities(&self) -> Vec<pb::DeviceCapability> {
        base_capabilities(NOT_YET)
    }
}

/// A device simulated in the state dir, for demos, tests and the benchmark.
#[derive(Debug, Default)]
pub struct SimulatedBackend;

impl Backend for SimulatedBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }
    fn capabilities(&self) -> Vec<pb::DeviceCapability> {
        base_capabilities(NOT_YET)
    }
}

/// The backend named on the command line.
pub fn by_name(name: &str) -> Option<Box<dyn Backend>> {
    match name {
        "system" => Some(Box::new(SystemBackend)),
        "simulated" => Some(Box::new(SimulatedBackend)),
        _ => None,
    }
}
