//! `mdm-agent run`: keep a stream to the server open, renew the device
//! certificate before it expires, obey unenroll, reconnect with backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mdm_proto::v1 as pb;
use mdm_proto::v1::agent_service_client::AgentServiceClient;
use mdm_proto::v1::connect_request::Message as Outbound;
use mdm_proto::v1::connect_response::Message as Inbound;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::backend::{Backend, Task};
use crate::client;
use crate::enroll::{key_and_csr, millis_of};
use crate::journal::{Journal, Outcome, Stage};
use crate::state::{Identity, StateDir};

const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct RunOptions {
    pub state: StateDir,
    pub backend: Arc<dyn Backend>,
    pub serial_override: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// An admin unenrolled the device; its identity is gone.
    Unenrolled,
    /// Asked to stop.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("this device is not enrolled; run `mdm-agent enroll` first")]
    NotEnrolled,
    #[error("the device certificate expired while the agent was away; enroll again")]
    Expired,
    #[error("cannot use the state dir: {0}")]
    State(#[from] std::io::Error),
}

enum SessionEnd {
    Unenrolled,
    RenewDue,
    Stopped,
    Failed(Status),
}

fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// An UNAUTHENTICATED answer naming revocation: the server no longer knows us.
fn is_revoked(status: &Status) -> bool {
    status.code() == Code::Unauthenticated
        && (status.message().contains("revoked") || status.message().contains("not enrolled"))
}

/// Exponential backoff with full jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
    fn next_delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub async fn run(
    options: RunOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<RunOutcome, RunError> {
    let mut backoff = Backoff::new();
    let journal = Arc::new(Mutex::new(Journal::open(options.state.root())?));
    // One worker for the whole run, not one per stream: a command still being
    // applied when the stream drops must not be picked up again by the next
    // stream's worker (it would be applied twice).
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let policy: Arc<Mutex<Option<pb::PasscodePolicy>>> = Arc::default();
    tokio::spawn(worker(
        work_rx,
        options.backend.clone(),
        journal.clone(),
        policy.clone(),
    ));
    let work = Work {
        queue: work_tx,
        policy,
    };
    loop {
        let identity = options.state.load()?.ok_or(RunError::NotEnrolled)?;
        if now_millis() >= identity.expires_at {
            return Err(RunError::Expired);
        }
        let ca = options.state.ca_pem()?;
        let cert = options.state.cert_pem()?;
        let key = options.state.key_pem()?;
        let end = match client::channel(&identity.server, &ca, Some((&cert, &key))).await {
            Err(error) => SessionEnd::Failed(Status::unavailable(error.to_string())),
            Ok(channel) if now_millis() >= identity.renew_after => {
                match renew(channel, &options.state, &identity).await {
                    Ok(()) => SessionEnd::RenewDue,
                    Err(status) => SessionEnd::Failed(status),
                }
            }
            Ok(channel) => {
                session(channel, &identity, &options, &work, &mut backoff, &mut stop).await
            }
        };
        match end {
            SessionEnd::Unenrolled => {
                options.state.wipe()?;
                tracing::warn!(
                    "this device was unenrolled by an administrator; its identity is removed"
                );
                return Ok(RunOutcome::Unenrolled);
            }
            SessionEnd::Stopped => return Ok(RunOutcome::Stopped),
            SessionEnd::RenewDue => continue,
            SessionEnd::Failed(status) if is_revoked(&status) => {
                options.state.wipe()?;
                tracing::warn!(
                    reason = status.message(),
                    "the server revoked this device; its identity is removed"
                );
                return Ok(RunOutcome::Unenrolled);
            }
            SessionEnd::Failed(status) => {
                let delay = backoff.next_delay();
                tracing::warn!(code = ?status.code(), reason = status.message(), ?delay, "connection lost; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => return Ok(RunOutcome::Stopped),
                }
            }
        }
    }
}

/// Replaces the key and certificate with fresh ones.
async fn renew(channel: Channel, state: &StateDir, identity: &Identity) -> Result<(), Status> {
    let (key_pem, csr_pem) = key_and_csr(&identity.device_id).map_err(Status::internal)?;
    let response = AgentServiceClient::new(channel)
        .renew_certificate(pb::RenewCertificateRequest { csr_pem })
        .await?
        .into_inner();
    let renewed = Identity {
        renew_after: millis_of(response.renew_after.as_ref()),
        expires_at: millis_of(response.expires_at.as_ref()),
        ..identity.clone()
    };
    let ca = state
        .ca_pem()
        .map_err(|e| Status::internal(e.to_string()))?;
    state
        .save(&renewed, &key_pem, &response.certificate_chain_pem, &ca)
        .map_err(|e| Status::internal(e.to_string()))?;
    tracing::info!(
        expires_at = renewed.expires_at,
        "device certificate renewed"
    );
    Ok(())
}

fn message(message: Outbound) -> pb::ConnectRequest {
    pb::ConnectRequest {
        message: Some(message),
    }
}

/// Commands are applied one at a time, in order, off the stream loop; each
/// comes with the stream it arrived on, where its reports go.
struct Work {
    queue: mpsc::UnboundedSender<(pb::Command, mpsc::Sender<pb::ConnectRequest>)>,
    policy: Arc<Mutex<Option<pb::PasscodePolicy>>>,
}

async fn session(
    channel: Channel,
    identity: &Identity,
    options: &RunOptions,
    work: &Work,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let (tx, rx) = mpsc::channel(64);
    let policy = &work.policy;
    let hello = pb::AgentHello {
        facts: Some(crate::facts::collect(
            options.serial_override.as_deref(),
            options.backend.capabilities(),
        )),
        compliance: None,
    };
    let _ = tx.send(message(Outbound::Hello(hello))).await;
    let mut inbound = match AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return SessionEnd::Failed(status),
    };
    tracing::info!(device_id = %identity.device_id, server = %identity.server, "connected");
    backoff.reset();
    let renew_in =
        Duration::from_millis(u64::try_from(identity.renew_after - now_millis()).unwrap_or(0));
    let renew_at = tokio::time::Instant::now() + renew_in;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
    let mut interval = Duration::from_secs(30);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            received = inbound.message() => match received {
                Ok(Some(pb::ConnectResponse { message: Some(message) })) => { last_heard = tokio::time::Instant::now(); match message {
                    Inbound::Hello(hello) => {
                        if let Some(announced) = hello.policy {
                            report_compliance(&tx, options.backend.as_ref(), policy, announced).await;
                        }
                        if let Some(announced) = hello.heartbeat_interval {
                            let announced = Duration::new(
                                u64::try_from(announced.seconds).unwrap_or(30),
                                u32::try_from(announced.nanos).unwrap_or(0),
                            );
                            if !announced.is_zero() {
                                heartbeat = tokio::time::interval(announced);
                                interval = announced;
                            }
                        }
                    }
                    Inbound::Heartbeat(_) => {}
                    Inbound::Command(command) if command.r#type() == pb::ActionType::Unenroll => {
                        return SessionEnd::Unenrolled;
                    }
                    Inbound::Command(command) => {
                        let _ = work.queue.send((command, tx.clone()));
                    }
                    Inbound::Policy(announced) => {
                        report_compliance(&tx, options.backend.as_ref(), policy, announced).await;
                    }
                }},
                Ok(Some(_)) => {}
                Ok(None) => return SessionEnd::Failed(Status::unavailable("the server closed the stream")),
                Err(status) => return SessionEnd::Failed(status),
            },
            _ = heartbeat.tick() => {
                // A server silent for two intervals is gone: reconnect.
                if last_heard.elapsed() > interval * 2 {
                    return SessionEnd::Failed(Status::unavailable("no heartbeat from the server for two intervals"));
                }
                let beat = pb::Heartbeat { sent_at: None };
                if tx.send(message(Outbound::Heartbeat(beat))).await.is_err() {
                    return SessionEnd::Failed(Status::unavailable("the stream closed"));
                }
            }
            () = tokio::time::sleep_until(renew_at) => return SessionEnd::RenewDue,
            () = stopped(stop) => return SessionEnd::Stopped,
        }
    }
}

fn journal_record(journal: &Mutex<Journal>, command_id: &str, stage: Stage) -> std::io::Result<()> {
    journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(command_id, stage)
}

fn failed(code: pb::FailureCode, message: impl Into<String>) -> Outcome {
    Outcome {
        succeeded: false,
        failure_code: code.into(),
        message: message.into(),
        steps: Vec::new(),
    }
}

/// Applies commands in order: store (then acknowledge), apply through the
/// backend, store the outcome, report it. A command seen before is never
/// applied again; its stored outcome is reported again instead.
async fn worker(
    mut commands: mpsc::UnboundedReceiver<(pb::Command, mpsc::Sender<pb::ConnectRequest>)>,
    backend: Arc<dyn Backend>,
    journal: Arc<Mutex<Journal>>,
    policy: Arc<Mutex<Option<pb::PasscodePolicy>>>,
) {
    while let Some((command, tx)) = commands.recv().await {
        let id = command.command_id.clone();
        let stage = journal.lock().unwrap_or_else(|p| p.into_inner()).stage(&id);
        let outcome = match stage {
            Some(Stage::Done(outcome)) => outcome,
            Some(Stage::Applying) => {
                let outcome = failed(
                    pb::FailureCode::Internal,
                    "the agent stopped while applying this command; it was not applied again",
                );
                if journal_record(&journal, &id, Stage::Done(outcome.clone())).is_err() {
                    continue;
                }
                outcome
            }
            Some(Stage::Received) | None => {
                if let Err(error) = journal_record(&journal, &id, Stage::Received) {
                    tracing::error!(%error, "cannot store a command; not acknowledged");
                    continue;
                }
                let _ = tx
                    .send(message(Outbound::Ack(pb::CommandAck {
                        command_id: id.clone(),
                    })))
                    .await;
                let outcome = apply(&command, &backend, &journal, &tx).await;
                if let Err(error) = journal_record(&journal, &id, Stage::Done(outcome.clone())) {
                    tracing::error!(%error, "cannot store a command outcome");
                }
                if std::env::var_os("MDM_SIMULATED_EXIT_BEFORE_RESULT").is_some()
                    && backend.name() == "simulated"
                {
                    // Fault injection for tests: die between applying and reporting.
                    std::process::exit(3);
                }
                outcome
            }
        };
        for step in &outcome.steps {
            let progress = pb::CommandProgress {
                command_id: id.clone(),
                step: step.clone(),
            };
            let _ = tx.send(message(Outbound::Progress(progress))).await;
        }
        let result = pb::CommandResult {
            command_id: id.clone(),
            succeeded: outcome.succeeded,
            failure_code: outcome.failure_code,
            message: outcome.message.clone(),
        };
        if tx.send(message(Outbound::Result(result))).await.is_err() {
            tracing::info!(command_id = %id, "result kept; it is sent after reconnecting");
        }
        let known = *policy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = known
            && outcome.succeeded
            && command.r#type() == pb::ActionType::ResetPasscode
        {
            report_compliance(&tx, backend.as_ref(), &policy, known).await;
        }
    }
}

async fn apply(
    command: &pb::Command,
    backend: &Arc<dyn Backend>,
    journal: &Arc<Mutex<Journal>>,
    tx: &mpsc::Sender<pb::ConnectRequest>,
) -> Outcome {
    let id = command.command_id.clone();
    if millis_of(command.expires_at.as_ref()) < now_millis() {
        return failed(
            pb::FailureCode::Expired,
            "the command expired before it reached the device",
        );
    }
    let task = match &command.payload {
        Some(pb::command::Payload::Lock(lock)) => Task::Lock {
            message: lock.message.clone(),
        },
        Some(pb::command::Payload::ResetPasscode(reset)) => Task::ResetPasscode {
            passcode: zeroize::Zeroizing::new(reset.passcode.clone()),
            message: reset.message.clone(),
        },
        _ => {
            return failed(
                pb::FailureCode::Unsupported,
                "this agent does not know this command",
            );
        }
    };
    if let Err(error) = journal_record(journal, &id, Stage::Applying) {
        return failed(
            pb::FailureCode::Internal,
            format!("cannot store the command: {error}"),
        );
    }
    let started = pb::CommandProgress {
        command_id: id.clone(),
        step: "started".into(),
    };
    let _ = tx.send(message(Outbound::Progress(started))).await;
    let backend = backend.clone();
    let applied = tokio::task::spawn_blocking(move || {
        let mut steps = Vec::new();
        let result = backend.apply(&id, &task, &mut |step| steps.push(step.to_owned()));
        (result, steps)
    })
    .await;
    match applied {
        Ok((Ok(()), steps)) => Outcome {
            succeeded: true,
            failure_code: pb::FailureCode::Unspecified.into(),
            message: "done".into(),
            steps,
        },
        Ok((Err(failure), steps)) => Outcome {
            steps,
            ..failed(failure.code, failure.message)
        },
        Err(error) => failed(
            pb::FailureCode::Internal,
            format!("the backend crashed: {error}"),
        ),
    }
}

/// Remembers the site's policy and tells the server whether the device meets it.
async fn report_compliance(
    tx: &mpsc::Sender<pb::ConnectRequest>,
    backend: &dyn Backend,
    known: &Mutex<Option<pb::PasscodePolicy>>,
    policy: pb::PasscodePolicy,
) {
    *known.lock().unwrap_or_else(|p| p.into_inner()) = Some(policy);
    if let Some(compliance) = backend.compliance(&policy) {
        let _ = tx.send(message(Outbound::Compliance(compliance))).await;
    }
}
