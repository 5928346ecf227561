//! `mdm.v1.EnrollmentService`: open to clients without a certificate. Every
//! refusal but throttling is the same PERMISSION_DENIED, so a caller learns
//! nothing about which part was wrong; the reason goes to the log.

use crate::error::IntoStatus;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use mdm_proto::v1 as pb;
use mdm_proto::v1::enrollment_service_server::EnrollmentService;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::convert::{self, timestamp};
use crate::app::App;
use crate::identity::DeviceAuthenticator;
use mdm_core::domain::devices::{EnrollError, EnrollRequest};

pub const REFUSED: &str = "enrollment refused";

#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    app: Arc<App>,
    devices: DeviceAuthenticator,
}

impl EnrollmentApi {
    pub fn new(app: Arc<App>, devices: DeviceAuthenticator) -> Self {
        Self { app, devices }
    }
}

fn refuse(source: IpAddr, reason: &str) -> Status {
    tracing::warn!(%source, reason, "enrollment refused");
    Status::permission_denied(REFUSED)
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let source = request
            .remote_addr()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        // A client may prove it is an enrolled device (to re-enroll it in
        // place) by presenting that device's current certificate.
        let proven_device = match crate::identity::leaf_certificate(&request) {
            Some(leaf) => self
                .devices
                .authenticate_der(&leaf)
                .await
                .ok()
                .map(|device| device.device_id),
            None => None,
        };
        let request = request.into_inner();
        // Moved into a zeroizing buffer at once; the proto string is dropped with the request.
        let company_passcode = Zeroizing::new(request.company_passcode);
        if request.user_email.len() > 254 || company_passcode.len() > 64 {
            return Err(refuse(source, "oversized email or passcode"));
        }
        let Some(facts) = request.device else {
            return Err(refuse(source, "no device facts"));
        };
        let facts = convert::device_facts(facts).map_err(|reason| refuse(source, &reason))?;
        let enrollment = self
            .app
            .enroll(EnrollRequest {
                user_email: request.user_email,
                company_passcode,
                csr_pem: request.csr_pem,
                facts,
                source,
                proven_device,
            })
            .await;
        match enrollment {
            Ok(enrollment) => Ok(Response::new(pb::EnrollResponse {
                device_id: enrollment.device.device_id,
                site_id: enrollment.device.site_id,
                certificate_chain_pem: enrollment.certificate.chain_pem,
                ca_certificate_pem: enrollment.certificate.ca_pem,
                renew_after: Some(timestamp(enrollment.certificate.renew_after)),
                expires_at: Some(timestamp(enrollment.certificate.expires_at)),
            })),
            Err(EnrollError::Throttled) => {
                tracing::warn!(%source, "enrollment throttled");
                Err(Status::resource_exhausted(
                    "too many failed enrollment attempts from this address; try again later",
                ))
            }
            Err(EnrollError::Refused(reason)) => Err(refuse(source, &reason)),
            Err(EnrollError::Internal(error)) => Err(error.into_status()),
        }
    }
}
