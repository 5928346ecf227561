//! Assembles the server: data dir, storage, TLS, identity, services,
//! reflection and health; serves until the shutdown future resolves.

use std::future::Future;
use std::sync::Arc;

use mdm_proto::v1::{
    action_log_service_server::ActionLogServiceServer, agent_service_server::AgentServiceServer,
    device_service_server::DeviceServiceServer, enrollment_service_server::EnrollmentServiceServer,
    site_service_server::SiteServiceServer, user_service_server::UserServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::api;
use crate::app::App;
use crate::config::Config;
use crate::crypto::ServerKeys;
use crate::datadir::{self, DataDir, DataDirError, FirstStart};
use crate::identity::{AdminAuthenticator, DeviceAuthenticator};
use crate::tls;
use mdm_core::store::Store;
use mdm_store_sled::Storage;

/// Largest request message the server decodes; bigger ones are refused
/// before they are buffered whole.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// The longest any call's handler may run (streams: until they are set up).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Calls in flight on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Storage(#[from] mdm_store_sled::StorageError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot read the listener address: {0}")]
    Listener(std::io::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot set up reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
    #[error(transparent)]
    Database(#[from] mdm_store_postgres::PgOpenError),
    #[error(transparent)]
    Store(#[from] mdm_core::store::StoreError),
    #[error("stopped while waiting for the database")]
    StoppedWaiting,
    #[error(
        "the database of the data dir {data_dir} was migrated to PostgreSQL ({marker}); start with --database-url (or MDM_DATABASE_URL), or remove that file to serve the copy left in the data dir"
    )]
    Migrated {
        data_dir: std::path::PathBuf,
        marker: std::path::PathBuf,
    },
}

impl ServerError {
    /// Whether the cause is a setting the admin has to change (exit 64).
    pub fn is_configuration(&self) -> bool {
        use mdm_store_postgres::PgOpenError;
        matches!(
            self,
            ServerError::Migrated { .. }
                | ServerError::Database(
                    PgOpenError::BadUrl(_)
                        | PgOpenError::BadCaFile { .. }
                        | PgOpenError::Tls(_)
                        | PgOpenError::Refused { .. }
                        | PgOpenError::SchemaTooNew { .. }
                )
        )
    }
}

/// Longest wait between two tries to reach a database that is down at start.
const DATABASE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// The store the config names: PostgreSQL, or the data dir's sled database.
/// A PostgreSQL that cannot be reached yet is tried again (with a log line
/// each time) until it answers or `shutdown` resolves; one that refuses
/// (bad URL, wrong password, a newer schema) is an error at once.
async fn open_store(
    config: &Config,
    dir: &DataDir,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Arc<dyn Store>, ServerError> {
    let Some(database) = &config.database else {
        let marker = dir.migrated_marker();
        if marker.exists() {
            return Err(ServerError::Migrated {
                data_dir: dir.root().to_path_buf(),
                marker,
            });
        }
        return Ok(Arc::new(Storage::open(&dir.db())?));
    };
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        match mdm_store_postgres::PgStore::connect(database.clone()).await {
            Ok(store) => {
                tracing::info!(database = store.target(), "storing in PostgreSQL");
                return Ok(Arc::new(store));
            }
            Err(mdm_store_postgres::PgOpenError::Unreachable { target, reason }) => {
                tracing::warn!(%target, %reason, retry_in = ?wait, "the database is not reachable; retrying");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut *shutdown => return Err(ServerError::StoppedWaiting),
                }
                wait = (wait * 2).min(DATABASE_RETRY_MAX);
            }
            Err(other) => return Err(other.into()),
        }
    }
}

/// Creates the data dir on first start; on later starts checks it is ours.
/// Returns what a first start created, so the caller can tell the admin.
pub fn prepare_data_dir(config: &Config) -> Result<Option<FirstStart>, DataDirError> {
    let dir = DataDir::new(&config.data_dir);
    if dir.is_fresh()? {
        let created = datadir::initialize(&config.data_dir, &config.owner_email)?;
        return Ok(Some(created));
    }
    dir.check_layout()?;
    Ok(None)
}

/// The domain services over an opened data dir.
pub fn open_app(dir: &DataDir, store: Arc<dyn Store>, config: &Config) -> Result<App, ServerError> {
    let keys = ServerKeys::new(dir.load_secret()?);
    let ca = Arc::new(dir.load_ca()?);
    Ok(App::new(store, Arc::new(dir.registry()), &keys, ca, config))
}

/// DNS names and addresses the server certificate covers.
pub fn server_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = gethostname::gethostname().to_str()
        && !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
    {
        names.push(host.to_ascii_lowercase());
    }
    let ip = config.listen.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names.extend(config.sans.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// Runs the server on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight calls finish (up to the drain timeout) and
/// flushes storage.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    prepare_data_dir(&config)?;
    let dir = DataDir::new(&config.data_dir);
    let mut shutdown = Box::pin(shutdown);
    let store = open_store(&config, &dir, &mut shutdown).await?;
    let ca = dir.load_ca()?;
    let (server_chain, server_key) = dir.server_identity(&ca, &server_names(&config))?;
    let acceptor = tls::acceptor(ca.cert_pem(), &server_chain, &server_key)?;
    drop(server_key);

    let app = Arc::new(open_app(&dir, store.clone(), &config)?);
    let admin_auth = AdminAuthenticator::new(app.registry.clone());
    let device_auth = {
        let app = app.clone();
        DeviceAuthenticator::new(move |device_id, serial| {
            let app = app.clone();
            Box::pin(async move {
                app.device_certificate_valid(&device_id, &serial)
                    .await
                    .map(|valid| !valid)
                    .map_err(crate::error::status)
            })
        })
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mdm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mdm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = Arc::new(tls::Connections::default());
    let authorize: Arc<tls::Authorize> = {
        let (admins, devices) = (admin_auth.clone(), device_auth.clone());
        Arc::new(move |der: &[u8]| {
            Box::pin(crate::identity::authorizer(
                admins.clone(),
                devices.clone(),
                der.to_vec(),
            ))
        })
    };
    let admin = admin_auth.interceptor();
    let site = InterceptedService::new(
        SiteServiceServer::new(api::SiteApi::new(app.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        admin.clone(),
    );
    let user = InterceptedService::new(
        UserServiceServer::new(api::UserApi::new(app.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        admin.clone(),
    );
    let device = InterceptedService::new(
        DeviceServiceServer::new(api::DeviceApi::new(app.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        admin.clone(),
    );
    let action_log = InterceptedService::new(
        ActionLogServiceServer::new(api::ActionLogApi::new(app.clone(), stop_rx.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        admin,
    );
    let enrollment =
        EnrollmentServiceServer::new(api::EnrollmentApi::new(app.clone(), device_auth.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let agent = InterceptedService::new(
        AgentServiceServer::new(api::AgentApi::new(
            app.clone(),
            stop_rx.clone(),
            connections.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        device_auth.interceptor(),
    );

    let local_addr = listener.local_addr().map_err(ServerError::Listener)?;
    let (ready_tx, ready_rx) = mpsc::channel(256);
    let accept = tokio::spawn(tls::accept_loop(
        listener,
        tls::Acceptance {
            acceptor,
            limits: tls::SourceLimits::new(config.connections_per_source),
            connections,
            authorize,
        },
        ready_tx,
        stop_rx.clone(),
    ));
    let incoming = ReceiverStream::new(ready_rx).map(Ok::<_, std::io::Error>);

    for service in [
        "mdm.v1.SiteService",
        "mdm.v1.UserService",
        "mdm.v1.DeviceService",
        "mdm.v1.ActionLogService",
        "mdm.v1.EnrollmentService",
        "mdm.v1.AgentService",
        "",
    ] {
        health_reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    tracing::info!(%local_addr, data_dir = %config.data_dir.display(), "serving");

    // The outbox is delivered in the background.
    let outbox = crate::notify::Outbox::new(
        app.clone(),
        config.smtp.as_ref(),
        dir.root().join("outbox/mail"),
        config.outbox_retry,
    )?;
    let outbox = tokio::spawn(outbox.run(stop_rx.clone()));

    // Commands whose time ran out are expired in the background.
    let expiry = {
        let app = app.clone();
        let mut stop = stop_rx.clone();
        let every = config.expiry_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(error) = app.expire_due_commands().await {
                            tracing::error!(%error, "expiring commands failed");
                        }
                    }
                    () = tls::stopped(&mut stop) => return,
                }
            }
        })
    };

    let signal = {
        let stop_tx = stop_tx.clone();
        let health_reporter = health_reporter.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, draining calls");
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let _ = stop_tx.send(true);
        }
    };
    let serve = Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // Bounds every call's handler; a stream's handler returns as soon as
        // the stream is set up, so long-lived streams are not cut.
        .timeout(REQUEST_TIMEOUT)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(site)
        .add_service(user)
        .add_service(device)
        .add_service(action_log)
        .add_service(enrollment)
        .add_service(agent)
        .serve_with_incoming_shutdown(incoming, signal);

    let mut stopped = stop_rx.clone();
    let drain_timeout = config.drain_timeout;
    let result = tokio::select! {
        result = serve => result,
        // Long-lived streams may never end on their own: bound the drain.
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(?drain_timeout, "calls still open after the drain timeout; closing them");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    accept.abort();
    let _ = expiry.await;
    let _ = outbox.await;
    app.close().await;
    // tonic returns once every connection has let go of its shutdown signal,
    // which can be a moment before the task drops its handle on the services.
    // Wait for those handles so the database is closed when `run` returns and
    // a restart in the same process can open it again.
    let released = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while Arc::strong_count(&app) > 1 && tokio::time::Instant::now() < released {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    store.close().await?;
    drop(store);
    tracing::info!("stopped; storage flushed");
    result.map_err(ServerError::from)
}
