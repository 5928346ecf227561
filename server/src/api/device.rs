//! `mdm.v1.DeviceService`.

use crate::error::IntoStatus;
use crate::error::OrStatus;
use std::sync::Arc;

use mdm_proto::v1 as pb;
use mdm_proto::v1::device_service_server::DeviceService;
use tonic::{Request, Response, Status};

use super::convert::{self, authorize_object, authorize_site, required_id};
use crate::app::App;
use crate::identity;
use crate::model::{ActionType, CommandPayload};

#[derive(Debug, Clone)]
pub struct DeviceApi {
    app: Arc<App>,
}

impl DeviceApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Rpc<pb::ListDevicesResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let platform = match request.platform() {
            pb::Platform::Unspecified => None,
            other => Some(convert::platform_from_proto(other)),
        };
        let status = convert::device_status_from_proto(request.status());
        let user = request.user_email.trim().to_ascii_lowercase();
        let filter = mdm_core::store::DeviceFilter {
            platform,
            status,
            user_email: user,
        };
        let page = self
            .app
            .list_devices(
                site_id,
                &filter,
                convert::page_request(&request.page_token, request.page_size)?,
            )
            .await
            .or_status()?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: page
                .items
                .into_iter()
                .map(|d| {
                    let online = self.app.is_online(&d.device_id);
                    convert::device(d, online)
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Rpc<pb::GetDeviceResponse> {
        let admin = identity::admin(&request)?;
        let device_id = required_id("device_id", &request.get_ref().device_id)?;
        let device = self.app.get_device(device_id).await.or_status()?;
        authorize_object(&admin, &device.site_id, "device", device_id)?;
        let online = self.app.is_online(device_id);
        let security = self
            .app
            .security_view(&device, &admin.email)
            .await
            .or_status()?;
        let audit_trail = self.app.audit_trail(device_id, 50).await.or_status()?;
        let mut device = convert::device(std::sync::Arc::unwrap_or_clone(device), online);
        device.security = Some(convert::security(security));
        Ok(Response::new(pb::GetDeviceResponse {
            device: Some(device),
            audit_trail: audit_trail.into_iter().map(convert::audit_entry).collect(),
        }))
    }

    async fn reset_passcode(
        &self,
        request: Request<pb::ResetPasscodeRequest>,
    ) -> Rpc<pb::ResetPasscodeResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let device_id = required_id("device_id", &request.device_id)?;
        let device = self.app.get_device(device_id).await.or_status()?;
        authorize_object(&admin, &device.site_id, "device", device_id)?;
        if request.confirm_user_email.trim().is_empty() {
            return Err(crate::error::Error::FailedPrecondition(
                "confirm_user_email is required: name the device's user to confirm the right device".into(),
            )
            .into_status());
        }
        let message = convert::lock_message(request.message)?;
        let ttl = convert::duration("ttl", request.ttl)?;
        let (action, passcode) = self
            .app
            .reset_passcode(
                &device,
                &admin.email,
                &request.confirm_user_email,
                request.notify_user,
                message,
                ttl,
            )
            .await
            .or_status()?;
        Ok(Response::new(pb::ResetPasscodeResponse {
            action: Some(convert::action(action)),
            passcode: passcode.as_str().to_owned(),
        }))
    }

    async fn lock_device(
        &self,
        request: Request<pb::LockDeviceRequest>,
    ) -> Rpc<pb::LockDeviceResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let device_id = required_id("device_id", &request.device_id)?;
        let device = self.app.get_device(device_id).await.or_status()?;
        authorize_object(&admin, &device.site_id, "device", device_id)?;
        let message = convert::lock_message(request.message)?;
        let ttl = convert::duration("ttl", request.ttl)?;
        let action = self
            .app
            .queue_command(
                &device,
                &admin.email,
                ActionType::Lock,
                CommandPayload::Lock { message },
                ttl,
            )
            .await
            .or_status()?;
        Ok(Response::new(pb::LockDeviceResponse {
            action: Some(convert::action(action)),
        }))
    }

    async fn unenroll_device(
        &self,
        request: Request<pb::UnenrollDeviceRequest>,
    ) -> Rpc<pb::UnenrollDeviceResponse> {
        let admin = identity::admin(&request)?;
        let device_id = required_id("device_id", &request.get_ref().device_id)?;
        let device = self.app.get_device(device_id).await.or_status()?;
        authorize_object(&admin, &device.site_id, "device", device_id)?;
        let action = self
            .app
            .unenroll_device(device_id, &admin.email)
            .await
            .or_status()?;
        Ok(Response::new(pb::UnenrollDeviceResponse {
            action: Some(convert::action(action)),
        }))
    }
}
