//! `mdm.v1.UserService`.

use crate::error::IntoStatus;
use crate::error::OrStatus;
use std::sync::Arc;

use mdm_proto::v1 as pb;
use mdm_proto::v1::user_service_server::UserService;
use tonic::{Request, Response, Status};

use super::convert::{self, authorize_object, authorize_site, required_id};
use crate::app::App;
use crate::error::Error;
use crate::identity;

#[derive(Debug, Clone)]
pub struct UserApi {
    app: Arc<App>,
}

impl UserApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl UserService for UserApi {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Rpc<pb::CreateUserResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let user = self
            .app
            .create_user(site_id, &request.email, &request.display_name)
            .await
            .or_status()?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(convert::user(user)),
        }))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Rpc<pb::GetUserResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let user = if !request.user_id.is_empty() {
            let user_id = required_id("user_id", &request.user_id)?;
            let user = self.app.get_user_by_id(user_id).await.or_status()?;
            authorize_object(&admin, &user.site_id, "user", user_id)?;
            user
        } else if !request.site_id.is_empty() && !request.email.is_empty() {
            let site_id = required_id("site_id", &request.site_id)?;
            authorize_site(&admin, site_id)?;
            self.app
                .get_user(site_id, &request.email)
                .await
                .or_status()?
        } else {
            return Err(
                Error::InvalidArgument("give user_id, or site_id and email".into()).into_status(),
            );
        };
        Ok(Response::new(pb::GetUserResponse {
            user: Some(convert::user(user)),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Rpc<pb::ListUsersResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let page = self
            .app
            .list_users(
                site_id,
                convert::page_request(&request.page_token, request.page_size)?,
            )
            .await
            .or_status()?;
        Ok(Response::new(pb::ListUsersResponse {
            users: page.items.into_iter().map(convert::user).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Rpc<pb::DeleteUserResponse> {
        let admin = identity::admin(&request)?;
        let user_id = required_id("user_id", &request.get_ref().user_id)?;
        let user = self.app.get_user_by_id(user_id).await.or_status()?;
        authorize_object(&admin, &user.site_id, "user", user_id)?;
        self.app.delete_user(user_id).await.or_status()?;
        tracing::info!(user_id, site_id = %user.site_id, admin = %admin.email, "user deleted");
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn import_users(
        &self,
        request: Request<pb::ImportUsersRequest>,
    ) -> Rpc<pb::ImportUsersResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let report = self
            .app
            .import_users(site_id, &request.csv)
            .await
            .or_status()?;
        Ok(Response::new(pb::ImportUsersResponse {
            imported: report.imported,
            errors: report
                .errors
                .into_iter()
                .map(|e| pb::ImportUserError {
                    line: e.line,
                    email: e.email,
                    reason: e.reason,
                })
                .collect(),
        }))
    }
}
