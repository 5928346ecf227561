//! `mdm.v1.ActionLogService`: security alerts and the notification outbox
//! (actions arrive with the command stream).

use crate::error::OrStatus;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use mdm_proto::v1 as pb;
use mdm_proto::v1::action_log_service_server::ActionLogService;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status};

use super::convert::{self, authorize_object, authorize_site, required_id};
use crate::app::App;
use crate::identity;
use crate::model::NotificationState;
use mdm_core::store::ActionFilter;

#[derive(Debug, Clone)]
pub struct ActionLogApi {
    app: Arc<App>,
    shutdown: watch::Receiver<bool>,
}

impl ActionLogApi {
    pub fn new(app: Arc<App>, shutdown: watch::Receiver<bool>) -> Self {
        Self { app, shutdown }
    }
}

type Rpc<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often an open watch checks that its admin may still see the site.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

impl ActionLogApi {
    /// Serves `events` to a watcher only while the admin who opened it may
    /// still manage `site_id`: revoking the certificate (or taking the site
    /// off its record) ends the watch with that status within a second, not
    /// at the next call. Also ends at shutdown, or when the watcher leaves.
    fn guarded<T: Send + 'static>(
        &self,
        certificate: Vec<u8>,
        site_id: String,
        events: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> BoxStream<T> {
        let authenticator = identity::AdminAuthenticator::new(self.app.registry.clone());
        let still_allowed = move || {
            let admin = authenticator.authenticate_der(&certificate)?;
            authorize_site(&admin, &site_id)
        };
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            let mut recheck = tokio::time::interval(RECHECK_EVERY);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stopped = crate::tls::stopped(&mut shutdown);
            tokio::pin!(stopped);
            loop {
                let item = tokio::select! {
                    biased;
                    _ = recheck.tick() => match still_allowed() {
                        Ok(()) => continue,
                        Err(status) => {
                            // A watcher that stopped reading does not get
                            // the status; its watch ends all the same.
                            let _ = tx.try_send(Err(status));
                            return;
                        }
                    },
                    () = &mut stopped => return,
                    () = tx.closed() => return,
                    item = events.next() => match item {
                        Some(item) => item,
                        None => return,
                    },
                };
                let last = item.is_err();
                // Waiting for room in a watcher that reads slowly still sees
                // a revocation.
                let permit = loop {
                    tokio::select! {
                        biased;
                        _ = recheck.tick() => if let Err(status) = still_allowed() {
                            let _ = tx.try_send(Err(status));
                            return;
                        },
                        () = &mut stopped => return,
                        permit = tx.reserve() => match permit {
                            Ok(permit) => break permit,
                            Err(_) => return,
                        },
                    }
                };
                permit.send(item);
                if last {
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl ActionLogService for ActionLogApi {
    async fn list_actions(
        &self,
        request: Request<pb::ListActionsRequest>,
    ) -> Rpc<pb::ListActionsResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let device_id = (!request.device_id.is_empty())
            .then(|| required_id("device_id", &request.device_id))
            .transpose()?;
        let site_id = match device_id {
            Some(device_id) => {
                let site_id = self
                    .app
                    .get_device(device_id)
                    .await
                    .or_status()?
                    .site_id
                    .clone();
                authorize_object(&admin, &site_id, "device", device_id)?;
                site_id
            }
            None => required_id("site_id", &request.site_id)?.to_owned(),
        };
        authorize_site(&admin, &site_id)?;
        self.app.get_site(&site_id).await.or_status()?;
        let action_type = convert::action_type_from_proto(request.r#type());
        let status = convert::action_status_from_proto(request.status());
        let filter = ActionFilter {
            site_id: site_id.clone(),
            device_id: device_id.map(str::to_owned),
            action_type,
            status,
            created_by: request.created_by.trim().to_ascii_lowercase(),
            created_at_or_after: request.created_after.as_ref().map(convert::millis_of),
            created_before: request.created_before.as_ref().map(convert::millis_of),
        };
        let page = self
            .app
            .store()
            .list_actions(
                &filter,
                convert::page_request(&request.page_token, request.page_size)?,
            )
            .await
            .map_err(crate::error::Error::from)
            .or_status()?;
        Ok(Response::new(pb::ListActionsResponse {
            actions: page.items.into_iter().map(convert::action).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_action(
        &self,
        request: Request<pb::GetActionRequest>,
    ) -> Rpc<pb::GetActionResponse> {
        let admin = identity::admin(&request)?;
        let action_id = required_id("action_id", &request.get_ref().action_id)?;
        let action = self.app.get_action(action_id).await.or_status()?;
        authorize_object(&admin, &action.site_id, "action", action_id)?;
        Ok(Response::new(pb::GetActionResponse {
            action: Some(convert::action(action)),
        }))
    }

    async fn cancel_action(
        &self,
        request: Request<pb::CancelActionRequest>,
    ) -> Rpc<pb::CancelActionResponse> {
        let admin = identity::admin(&request)?;
        let action_id = required_id("action_id", &request.get_ref().action_id)?;
        let action = self.app.get_action(action_id).await.or_status()?;
        authorize_object(&admin, &action.site_id, "action", action_id)?;
        let action = self
            .app
            .cancel_action(action_id, &admin.email)
            .await
            .or_status()?;
        Ok(Response::new(pb::CancelActionResponse {
            action: Some(convert::action(action)),
        }))
    }

    async fn watch_actions(
        &self,
        request: Request<pb::WatchActionsRequest>,
    ) -> Rpc<BoxStream<pb::WatchActionsResponse>> {
        let admin = identity::admin(&request)?;
        let certificate = identity::leaf_certificate(&request).unwrap_or_default();
        let request = request.into_inner();
        let device_id = (!request.device_id.is_empty())
            .then(|| required_id("device_id", &request.device_id).map(str::to_owned))
            .transpose()?;
        let site_id = match &device_id {
            Some(device_id) => {
                let site_id = self
                    .app
                    .get_device(device_id)
                    .await
                    .or_status()?
                    .site_id
                    .clone();
                authorize_object(&admin, &site_id, "device", device_id)?;
                site_id
            }
            None => required_id("site_id", &request.site_id)?.to_owned(),
        };
        authorize_site(&admin, &site_id)?;
        self.app.get_site(&site_id).await.or_status()?;
        let watched = site_id.clone();
        let stream = BroadcastStream::new(self.app.subscribe_actions())
            .filter_map(move |item| {
                let keep = match &item {
                    Ok(action) => {
                        action.site_id == watched
                            && device_id.as_ref().is_none_or(|d| &action.device_id == d)
                    }
                    Err(_) => true,
                };
                async move {
                    match item {
                        Ok(action) if keep => Some(Ok(pb::WatchActionsResponse {
                            action: Some(convert::action(action)),
                        })),
                        Ok(_) => None,
                        Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Status::resource_exhausted(format!(
                            "this watcher fell {missed} changes behind and was dropped; list actions and watch again"
                        )))),
                    }
                }
            });
        Ok(Response::new(self.guarded(certificate, site_id, stream)))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Rpc<pb::ListAlertsResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        self.app.get_site(site_id).await.or_status()?;
        // Lockouts are raised while counting failures, off the response path.
        self.app.settle_failed_attempts().await;
        let page = self
            .app
            .store()
            .list_alerts(
                site_id,
                convert::page_request(&request.page_token, request.page_size)?,
            )
            .await
            .map_err(crate::error::Error::from)
            .or_status()?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: page.items.into_iter().map(convert::alert).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn watch_alerts(
        &self,
        request: Request<pb::WatchAlertsRequest>,
    ) -> Rpc<BoxStream<pb::WatchAlertsResponse>> {
        let admin = identity::admin(&request)?;
        let certificate = identity::leaf_certificate(&request).unwrap_or_default();
        let site_id = required_id("site_id", &request.get_ref().site_id)?.to_owned();
        authorize_site(&admin, &site_id)?;
        self.app.get_site(&site_id).await.or_status()?;
        let watched = site_id.clone();
        let stream = BroadcastStream::new(self.app.subscribe_alerts())
            .filter_map(move |item| {
                let site_id = watched.clone();
                async move {
                    match item {
                        Ok(alert) if alert.site_id == site_id => Some(Ok(pb::WatchAlertsResponse {
                            alert: Some(convert::alert(alert)),
                        })),
                        Ok(_) => None,
                        Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Status::resource_exhausted(format!(
                            "this watcher fell {missed} alerts behind and was dropped; list alerts and watch again"
                        )))),
                    }
                }
            });
        Ok(Response::new(self.guarded(certificate, site_id, stream)))
    }

    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Rpc<pb::ListNotificationsResponse> {
        let admin = identity::admin(&request)?;
        let request = request.into_inner();
        let site_id = required_id("site_id", &request.site_id)?;
        authorize_site(&admin, site_id)?;
        let state = match request.state() {
            pb::NotificationState::Unspecified => None,
            pb::NotificationState::Pending => Some(NotificationState::Pending),
            pb::NotificationState::Delivered => Some(NotificationState::Delivered),
            pb::NotificationState::Failed => Some(NotificationState::Failed),
        };
        self.app.settle_failed_attempts().await;
        let page = self
            .app
            .store()
            .list_notifications(
                Some(site_id),
                state,
                convert::page_request(&request.page_token, request.page_size)?,
            )
            .await
            .map_err(crate::error::Error::from)
            .or_status()?;
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: page.items.into_iter().map(convert::notification).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}
