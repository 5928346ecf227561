//! `mdm.v1.AgentService`: certificate renewal and the device's stream.

use crate::error::OrStatus;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream};
use mdm_proto::v1 as pb;
use mdm_proto::v1::agent_service_server::AgentService;
use mdm_proto::v1::connect_response::Message as Outbound;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, AgentMessage, timestamp};
use crate::app::App;
use crate::identity;
use crate::live::{Registration, Signal, StreamEnd};
use crate::model::now_millis;
use crate::tls::Connections;
use mdm_core::domain::commands::{AgentReport, Delivery};

/// An agent must say hello this soon after opening its stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stream that must end may take to hand its last messages to
/// the agent before its connection is closed.
const DRAIN_BEFORE_CLOSE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct AgentApi {
    app: Arc<App>,
    shutdown: watch::Receiver<bool>,
    connections: Arc<Connections>,
}

impl AgentApi {
    pub fn new(
        app: Arc<App>,
        shutdown: watch::Receiver<bool>,
        connections: Arc<Connections>,
    ) -> Self {
        Self {
            app,
            shutdown,
            connections,
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn outbound(message: Outbound) -> Result<pb::ConnectResponse, Status> {
    Ok(pb::ConnectResponse {
        message: Some(message),
    })
}

impl AgentApi {
    /// The interceptor checked the certificate itself; whether it is still
    /// one of the device's is a store lookup, made here before anything else.
    async fn refuse_revoked(&self, device: &identity::DeviceIdentity) -> Result<(), Status> {
        if self
            .app
            .device_certificate_valid(&device.device_id, &device.serial)
            .await
            .or_status()?
        {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "the device certificate is revoked; enroll again",
            ))
        }
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let device = identity::device(&request)?;
        self.refuse_revoked(&device).await?;
        let certificate = self
            .app
            .renew_device_certificate(&device.device_id, &request.into_inner().csr_pem)
            .await
            .or_status()?;
        Ok(Response::new(pb::RenewCertificateResponse {
            certificate_chain_pem: certificate.chain_pem,
            renew_after: Some(timestamp(certificate.renew_after)),
            expires_at: Some(timestamp(certificate.expires_at)),
        }))
    }

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<BoxStream<pb::ConnectResponse>>, Status> {
        let device = identity::device(&request)?;
        self.refuse_revoked(&device).await?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("send a hello first")),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument("the stream ended before a hello"));
            }
            Ok(Ok(Some(message))) => message,
        };
        let (facts, compliance) = match convert::agent_message(first) {
            Ok(AgentMessage::Hello { facts, compliance }) => (facts, compliance),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
            Err(reason) => return Err(Status::invalid_argument(reason)),
        };
        self.app
            .device_seen(&device.device_id, facts)
            .await
            .or_status()?;
        if let Some(compliance) = compliance {
            self.app
                .record_compliance(&device.device_id, compliance)
                .await
                .or_status()?;
        }
        let policy = self
            .app
            .device_policy(&device.device_id)
            .await
            .or_status()?;
        let registration = self.app.live().register(&device.device_id);
        // An unenroll that ran since the interceptor's check found no stream
        // to tell: check again now that this one is registered.
        if !self
            .app
            .device_certificate_valid(&device.device_id, &device.serial)
            .await
            .or_status()?
        {
            drop(registration);
            return Err(Status::unauthenticated(
                "the device certificate is revoked; enroll again",
            ));
        }
        let interval = self.app.heartbeat_interval();
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(outbound(Outbound::Hello(pb::ServerHello {
                heartbeat_interval: Some(prost_types::Duration {
                    seconds: i64::try_from(interval.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(interval.subsec_nanos()).unwrap_or(0),
                }),
                policy: Some(convert::policy(policy)),
            })))
            .await;
        tracing::info!(device_id = %device.device_id, "agent connected");
        let session = Session {
            app: self.app.clone(),
            device_id: device.device_id,
            certificate_serial: device.serial,
            interval,
            tx,
            shutdown: self.shutdown.clone(),
            sent: HashSet::new(),
            registration,
        };
        let connections = self.connections.clone();
        tokio::spawn(async move {
            let (tx, close_connection) = session.run(inbound).await;
            if close_connection && let Some(peer) = peer {
                // Let an agent that reads take what was sent (then the
                // stream ends when `tx` is dropped); one that does not loses
                // its connection, or its stream would stay open.
                let drained = tokio::time::timeout(DRAIN_BEFORE_CLOSE, async {
                    while tx.capacity() < tx.max_capacity() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                drop(tx);
                if drained.is_err() {
                    connections.close(peer);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One live agent stream.
struct Session {
    app: Arc<App>,
    device_id: String,
    /// The certificate the stream was opened with, checked at every
    /// heartbeat: it may expire or be rotated out while the stream is open.
    certificate_serial: String,
    interval: Duration,
    tx: mpsc::Sender<Result<pb::ConnectResponse, Status>>,
    shutdown: watch::Receiver<bool>,
    /// Commands already carried by this stream.
    sent: HashSet<String>,
    registration: Registration,
}

/// Why a session stops.
enum Stop {
    /// Told out of band (unenroll, replacement, a newer stream).
    Told(StreamEnd),
    /// The agent stopped reading: its connection is closed too.
    Stuck,
    Other(&'static str),
}

impl From<&'static str> for Stop {
    fn from(reason: &'static str) -> Self {
        Stop::Other(reason)
    }
}

impl Session {
    /// Serves the stream until it must end. Returns the response sender (to
    /// see whether the agent took what is left) and whether the connection
    /// must be closed because the agent no longer reads its stream.
    async fn run(
        mut self,
        mut inbound: Streaming<pb::ConnectRequest>,
    ) -> (mpsc::Sender<Result<pb::ConnectResponse, Status>>, bool) {
        let stop = match self.push_queued().await {
            Err(stop) => stop,
            Ok(()) => self.serve(&mut inbound).await,
        };
        let (reason, close_connection) = match stop {
            Stop::Told(StreamEnd::Unenrolled { action_id }) => {
                let command = pb::Command {
                    command_id: action_id,
                    r#type: pb::ActionType::Unenroll.into(),
                    expires_at: Some(timestamp(now_millis() + 3_600_000)),
                    payload: Some(pb::command::Payload::Unenroll(pb::UnenrollCommand {})),
                };
                // Best effort: an agent that reads removes its identity (a
                // full queue means it does not read); its certificate is
                // refused from now on either way.
                let _ = self.tx.try_send(outbound(Outbound::Command(command)));
                ("the device was unenrolled", true)
            }
            Stop::Told(StreamEnd::Replaced) => ("the device enrolled again under a new id", true),
            Stop::Told(StreamEnd::Superseded) => ("a newer stream replaced this one", false),
            Stop::Stuck => ("the agent stopped reading", true),
            Stop::Other(reason) => (reason, false),
        };
        tracing::info!(device_id = %self.device_id, reason, "agent stream closed");
        // Dropping the session (its registration) takes the device offline.
        (self.tx, close_connection)
    }

    async fn serve(&mut self, inbound: &mut Streaming<pb::ConnectRequest>) -> Stop {
        let mut heartbeat = tokio::time::interval(self.interval);
        heartbeat.tick().await;
        let mut last_heard = Instant::now();
        // The end of the stream (or its error), when a batch ran into it.
        let mut held = None;
        // One shutdown future for the whole session: made anew on every turn
        // of the loop, it would take the lock of the watch all sessions share
        // twice per message.
        let mut shutdown = self.shutdown.clone();
        let stopped = crate::tls::stopped(&mut shutdown);
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                message = next_message(inbound, &mut held) => match message {
                    Ok(Some(message)) => {
                        last_heard = Instant::now();
                        // Messages that have already arrived are handled
                        // together: an agent's reports about one command
                        // (acknowledged, progress, result) become one write.
                        let mut batch = vec![message];
                        while batch.len() < MAX_BATCH {
                            match inbound.message().now_or_never() {
                                Some(Ok(Some(next))) => batch.push(next),
                                Some(end) => {
                                    held = Some(end);
                                    break;
                                }
                                None => break,
                            }
                        }
                        if let Err(reason) = self.handle_batch(batch).await {
                            return reason.into();
                        }
                    }
                    Ok(None) => return "the agent closed the stream".into(),
                    Err(status) => {
                        if matches!(status.code(), tonic::Code::Internal | tonic::Code::InvalidArgument | tonic::Code::OutOfRange) {
                            // Undecodable input: tell the agent why before closing.
                            let _ = self.send(Err(Status::invalid_argument(format!("malformed message: {}", status.message())))).await;
                        }
                        return "the stream broke".into();
                    }
                },
                signal = self.registration.next() => {
                    let handled = match signal {
                        Signal::End(end) => Err(Stop::Told(end)),
                        Signal::PolicyChanged => match self.app.device_policy(&self.device_id).await {
                            Ok(policy) => self.send(outbound(Outbound::Policy(convert::policy(policy)))).await,
                            Err(_) => Ok(()),
                        },
                        Signal::Rescan => self.push_queued().await,
                        Signal::Command(action) => self.send_command(&action).await,
                    };
                    if let Err(stop) = handled {
                        return stop;
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.interval * 2 {
                        return "no heartbeat for two intervals".into();
                    }
                    if matches!(self.app.device_certificate_valid(&self.device_id, &self.certificate_serial).await, Ok(false)) {
                        return "the stream's certificate expired or was replaced".into();
                    }
                    let beat = pb::Heartbeat { sent_at: Some(timestamp(now_millis())) };
                    if let Err(stop) = self.send(outbound(Outbound::Heartbeat(beat))).await {
                        return stop;
                    }
                }
                () = &mut stopped => return "the server is shutting down".into(),
            }
        }
    }

    /// Writes to the stream. An agent that takes nothing for two heartbeat
    /// intervals is stuck; an out-of-band end is seen while waiting.
    async fn send(&self, message: Result<pb::ConnectResponse, Status>) -> Result<(), Stop> {
        tokio::select! {
            biased;
            end = self.registration.ended() => Err(Stop::Told(end)),
            sent = tokio::time::timeout(self.interval * 2, self.tx.send(message)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err("the agent closed the stream".into()),
                Err(_) => Err(Stop::Stuck),
            },
        }
    }

    /// Sends every queued command this stream has not carried yet. Each is
    /// recorded as SENT durably before it goes out: a command still PENDING
    /// after a crash was never delivered, so superseding it is safe.
    async fn push_queued(&mut self) -> Result<(), Stop> {
        let queued = self
            .app
            .pending_commands(&self.device_id)
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot read the command queue");
                Stop::from("the command queue cannot be read")
            })?;
        let mut ids = Vec::new();
        let mut built = Vec::new();
        for action in queued {
            if self.sent.contains(&action.action_id) {
                continue;
            }
            let Some(command) = self.command(&action) else {
                continue;
            };
            ids.push(action.action_id.clone());
            built.push(command);
        }
        if ids.is_empty() {
            return Ok(());
        }
        let deliveries = self
            .app
            .mark_sent(&self.device_id, &ids)
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot record sent commands");
                Stop::from("the command queue cannot be written")
            })?;
        for (command, delivery) in built.into_iter().zip(deliveries) {
            if !matches!(delivery, Delivery::Withdrawn) {
                self.write_command(command).await?;
            }
        }
        Ok(())
    }

    /// Sends a command the admin call already recorded as SENT and committed.
    async fn send_command(&mut self, action: &crate::model::Action) -> Result<(), Stop> {
        if self.sent.contains(&action.action_id) {
            return Ok(());
        }
        match self.command(action) {
            Some(command) => self.write_command(command).await,
            None => Ok(()),
        }
    }

    /// The wire form of a queued command; None (logged) when its sealed
    /// passcode cannot be opened.
    fn command(&self, action: &crate::model::Action) -> Option<pb::Command> {
        let passcode = self.app.command_passcode(action);
        let command = convert::command(action, passcode.as_ref().map(|p| p.as_str()));
        if command.is_none() {
            tracing::error!(action_id = %action.action_id, "a queued command cannot be unsealed; skipped");
        }
        command
    }

    async fn write_command(&mut self, command: pb::Command) -> Result<(), Stop> {
        let action_id = command.command_id.clone();
        self.send(outbound(Outbound::Command(command))).await?;
        self.sent.insert(action_id);
        Ok(())
    }

    /// Handles messages in order; consecutive reports about one command are
    /// stored with one write.
    async fn handle_batch(&self, batch: Vec<pb::ConnectRequest>) -> Result<(), &'static str> {
        let mut group: Option<(String, Vec<AgentReport>)> = None;
        for message in batch {
            match convert::agent_message(message) {
                Ok(AgentMessage::Report { command_id, report }) => match &mut group {
                    Some((id, reports)) if *id == command_id => reports.push(report),
                    _ => {
                        if let Some((id, reports)) = group.replace((command_id, vec![report])) {
                            self.store_reports(&id, reports).await?;
                        }
                    }
                },
                other => {
                    if let Some((id, reports)) = group.take() {
                        self.store_reports(&id, reports).await?;
                    }
                    self.handle(other).await;
                }
            }
        }
        if let Some((id, reports)) = group {
            self.store_reports(&id, reports).await?;
        }
        Ok(())
    }

    async fn store_reports(
        &self,
        command_id: &str,
        reports: Vec<AgentReport>,
    ) -> Result<(), &'static str> {
        if let Err(error) = self
            .app
            .agent_reports(&self.device_id, command_id, reports)
            .await
        {
            tracing::error!(%error, "cannot record a command report");
            return Err("a command report cannot be stored");
        }
        Ok(())
    }

    /// A message that is not a report.
    async fn handle(&self, message: Result<AgentMessage, String>) {
        match message {
            Ok(AgentMessage::Heartbeat) => {
                if let Err(error) = self.app.device_seen(&self.device_id, None).await {
                    tracing::warn!(%error, "cannot record a heartbeat");
                }
            }
            // A hello is only checked as the first message; a later one, valid or not, is ignored.
            Ok(AgentMessage::Hello { .. }) | Err(_) => {
                tracing::warn!(device_id = %self.device_id, "second hello on one stream ignored");
            }
            Ok(AgentMessage::Compliance(compliance)) => {
                if let Err(error) = self
                    .app
                    .record_compliance(&self.device_id, compliance)
                    .await
                {
                    tracing::warn!(%error, "cannot record compliance");
                }
            }
            Ok(AgentMessage::Ignored(why)) => {
                tracing::warn!(device_id = %self.device_id, "{why}");
            }
            Ok(AgentMessage::Report { .. }) => {}
        }
    }
}

/// Messages handled together at most.
const MAX_BATCH: usize = 32;

/// The next message: one a batch ran into first, else from the stream.
async fn next_message(
    inbound: &mut Streaming<pb::ConnectRequest>,
    held: &mut Option<Result<Option<pb::ConnectRequest>, Status>>,
) -> Result<Option<pb::ConnectRequest>, Status> {
    match held.take() {
        Some(end) => end,
        None => inbound.message().await,
    }
}
