//! The gRPC edge: one module per service. Each converts and validates proto
//! messages into domain values, calls the domain, and maps errors through
//! `impl From<Error> for Status`. Domain code never sees prost types.

mod action_log;
pub mod convert;
mod site;
mod user;

pub use action_log::ActionLogApi;
pub use site::SiteApi;
pub use user::UserApi;

use mdm_proto::v1::{
    agent_service_server::AgentService, device_service_server::DeviceService,
    enrollment_service_server::EnrollmentService,
};

/// `DeviceService`: devices and the security actions on them.
#[derive(Debug, Clone)]
pub struct DeviceApi;
impl DeviceService for DeviceApi {}

/// `EnrollmentService`: self-service enrollment, open to clients without a certificate.
#[derive(Debug, Clone)]
pub struct EnrollmentApi;
impl EnrollmentService for EnrollmentApi {}

/// `AgentService`: the device's command stream and certificate renewal.
#[derive(Debug, Clone)]
pub struct AgentApi;
impl AgentService for AgentApi {}
