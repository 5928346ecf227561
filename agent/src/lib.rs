//! The MDM device agent as a library: enrollment, the connection loop and
//! the platform backends; `main` only parses the command line.
#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod enroll;
pub mod facts;
pub mod journal;
pub mod run;
pub mod state;
pub mod system;

/// The backend named on the command line.
pub fn backend_by_name(
    name: &str,
    state_dir: &std::path::Path,
    managed_account: Option<String>,
) -> Option<Box<dyn backend::Backend>> {
    match name {
        "system" => Some(Box::new(system::SystemBackend::new(managed_account))),
        "simulated" => Some(Box::new(backend::SimulatedBackend::new(state_dir))),
        _ => None,
    }
}
