//! The gRPC edge: one module per service. Each converts and validates proto
//! messages into domain values, calls the domain, and maps errors through
//! `impl From<Error> for Status`. Domain code never sees prost types.

use mdm_proto::v1::{
    action_log_service_server::ActionLogService, agent_service_server::AgentService,
    device_service_server::DeviceService, enrollment_service_server::EnrollmentService,
    site_service_server::SiteService, user_service_server::UserService,
};

/// `SiteService`: sites, company passcode and passcode policy.
#[derive(Debug, Clone)]
pub struct SiteApi;
impl SiteService for SiteApi {}

/// `UserService`: the users of a site.
#[derive(Debug, Clone)]
pub struct UserApi;
impl UserService for UserApi {}

/// `DeviceService`: devices and the security actions on them.
#[derive(Debug, Clone)]
pub struct DeviceApi;
impl DeviceService for DeviceApi {}

/// `ActionLogService`: actions, alerts and notifications.
#[derive(Debug, Clone)]
pub struct ActionLogApi;
impl ActionLogService for ActionLogApi {}

/// `EnrollmentService`: self-service enrollment, open to clients without a certificate.
#[derive(Debug, Clone)]
pub struct EnrollmentApi;
impl EnrollmentService for EnrollmentApi {}

/// `AgentService`: the device's command stream and certificate renewal.
#[derive(Debug, Clone)]
pub struct AgentApi;
impl AgentService for AgentApi {}
