//! The gRPC edge: one module per service. Each converts and validates proto
//! messages into domain values, calls the domain, and maps errors through
//! `impl From<Error> for Status`. Domain code never sees prost types.

mod action_log;
mod agent;
pub mod convert;
mod device;
mod enrollment;
mod site;
mod user;

pub use action_log::ActionLogApi;
pub use agent::AgentApi;
pub use device::DeviceApi;
pub use enrollment::{EnrollmentApi, REFUSED};
pub use site::SiteApi;
pub use user::UserApi;
