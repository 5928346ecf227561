//! `mdm.v1.SiteService`.

use crate::error::OrStatus;
use std::sync::Arc;

use mdm_proto::v1 as pb;
use mdm_proto::v1::site_service_server::SiteService;
use tonic::{Request, Response, Status};

use super::convert::{self, authorize_owner, authorize_site, required_id};
use crate::app::App;
use crate::identity;
use mdm_core::domain::sites::SiteChanges;

#[derive(Debug, Clone)]
pub struct SiteApi {
    app: Arc<App>,
}

impl SiteApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl SiteService for SiteApi {
    async fn create_site(
        &self,
        request: Request<pb::CreateSiteRequest>,
    ) -> Rpc<pb::CreateSiteResponse> {
        let admin = identity::admin(&request)?;
        authorize_owner(&admin, "create sites")?;
        let request = request.into_inner();
        let limit = (request.failed_attempt_limit != 0).then_some(request.failed_attempt_limit);
        let site = self
            .app
            .create_site(&request.display_name, limit)
            .await
            .or_status()?;
        tracing::info!(site_id = %site.site_id, admin = %admin.email, "CreateSite");
        Ok(Response::new(pb::CreateSiteResponse {
            site: Some(convert::site(site)),
        }))
    }

    async fn get_site(&self, request: Request<pb::GetSiteRequest>) -> Rpc<pb::GetSiteResponse> {
        let admin = identity::admin(&request)?;
        let site_id = required_id("site_id", &request.get_ref().site_id)?;
        authorize_site(&admin, site_id)?;
        let site = self.app.get_site(site_id).await.or_status()?;
        Ok(Response::new(pb::GetSiteResponse {
            site: Some(convert::site(site)),
        }))
    }

    async fn list_sites(
        &self,
        request: Request<pb::ListSitesRequest>,
    ) -> Rpc<pb::ListSitesResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let filter = mdm_core::store::SiteFilter {
            only: (!admin.is_owner()).then(|| admin.sites.clone()),
        };
        let page = self
            .app
            .list_sites(
                &filter,
                convert::page_request(&request.page_token, request.page_size)?,
            )
            .await
            .or_status()?;
        Ok(Response::new(pb::ListSitesResponse {
            sites: page.items.into_iter().map(convert::site).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_site(
        &self,
        request: Request<pb::UpdateSiteRequest>,
    ) -> Rpc<pb::UpdateSiteResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let changes = SiteChanges {
            display_name: request.display_name,
            failed_attempt_limit: request.failed_attempt_limit,
            reset_passcode_visible_days: request.reset_passcode_visible_days,
        };
        let site = self.app.update_site(site_id, changes).await.or_status()?;
        Ok(Response::new(pb::UpdateSiteResponse {
            site: Some(convert::site(site)),
        }))
    }

    async fn generate_company_passcode(
        &self,
        request: Request<pb::GenerateCompanyPasscodeRequest>,
    ) -> Rpc<pb::GenerateCompanyPasscodeResponse> {
        let admin = identity::admin(&request)?;
        let site_id = required_id("site_id", &request.get_ref().site_id)?;
        authorize_site(&admin, site_id)?;
        let (passcode, info) = self
            .app
            .generate_company_passcode(site_id, &admin.email)
            .await
            .or_status()?;
        Ok(Response::new(pb::GenerateCompanyPasscodeResponse {
            passcode: passcode.expose().to_owned(),
            info: Some(convert::passcode_info(info)),
        }))
    }

    async fn set_passcode_policy(
        &self,
        request: Request<pb::SetPasscodePolicyRequest>,
    ) -> Rpc<pb::SetPasscodePolicyResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let policy = convert::policy_from_proto(request.policy)?;
        let policy = self
            .app
            .set_passcode_policy(site_id, policy)
            .await
            .or_status()?;
        tracing::info!(site_id, admin = %admin.email, "passcode policy set");
        Ok(Response::new(pb::SetPasscodePolicyResponse {
            policy: Some(convert::policy(policy)),
        }))
    }

    async fn get_passcode_policy(
        &self,
        request: Request<pb::GetPasscodePolicyRequest>,
    ) -> Rpc<pb::GetPasscodePolicyResponse> {
        let admin = identity::admin(&request)?;
        let site_id = required_id("site_id", &request.get_ref().site_id)?;
        authorize_site(&admin, site_id)?;
        let policy = self.app.passcode_policy(site_id).await.or_status()?;
        Ok(Response::new(pb::GetPasscodePolicyResponse {
            policy: Some(convert::policy(policy)),
        }))
    }

    async fn set_webhook(
        &self,
        request: Request<pb::SetWebhookRequest>,
    ) -> Rpc<pb::SetWebhookResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let secret = self
            .app
            .set_site_webhook(site_id, &request.url)
            .await
            .or_status()?;
        tracing::info!(site_id, admin = %admin.email, removed = secret.is_none(), "webhook set");
        Ok(Response::new(pb::SetWebhookResponse {
            url: request.url.trim().to_owned(),
            secret: secret.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        }))
    }

    async fn get_company_passcode(
        &self,
        request: Request<pb::GetCompanyPasscodeRequest>,
    ) -> Rpc<pb::GetCompanyPasscodeResponse> {
        let admin = identity::admin(&request)?;
        let site_id = required_id("site_id", &request.get_ref().site_id)?;
        authorize_site(&admin, site_id)?;
        let info = self.app.company_passcode_info(site_id).await.or_status()?;
        Ok(Response::new(pb::GetCompanyPasscodeResponse {
            info: Some(convert::passcode_info(info)),
        }))
    }

    async fn disable_company_passcode(
        &self,
        request: Request<pb::DisableCompanyPasscodeRequest>,
    ) -> Rpc<pb::DisableCompanyPasscodeResponse> {
        let admin = identity::admin(&request)?;
        let site_id = required_id("site_id", &request.get_ref().site_id)?;
        authorize_site(&admin, site_id)?;
        let info = self
            .app
            .disable_company_passcode(site_id, &admin.email)
            .await
            .or_status()?;
        Ok(Response::new(pb::DisableCompanyPasscodeResponse {
            info: Some(convert::passcode_info(info)),
        }))
    }
}
