//! One session with the coordinator: register (claiming the running job if there is
//! one), then serve assignments and aborts and forward the job's reports.

use super::config::{capabilities, WorkerConfig};
use super::control::JobControl;
use super::current::{next_report, Current};
use super::env::JobEnv;
use super::job;
use super::link::{Attached, Deferred, SessionLink};
use super::{stopped, transfer, AgentError};
use crate::train::live_state::LiveSlot;
use cvdist_common::client::{connect, error_chain, Client};
use cvdist_common::proto::{
    coordinator_message, worker_message, Abort, Assignment, CoordinatorMessage, Heartbeat, RegisterRequest, Registered,
    WorkerMessage,
};
use cvdist_common::text::printable;
use cvdist_common::version::PROTOCOL_VERSION;
use std::net::TcpListener;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// What woke the session loop.
enum Next {
    Coordinator(Result<Option<CoordinatorMessage>, tonic::Status>),
    Report(Option<WorkerMessage>),
    Stop,
    DetachedTooLong,
}

/// One session with the coordinator: registers (claiming `current`'s attempt if there is
/// one), then serves assignments and aborts and forwards the job's reports until the
/// session ends. `current` outlives it.
pub(super) async fn session(
    cfg: &WorkerConfig,
    listener: &TcpListener,
    advertise: &str,
    mut stop: watch::Receiver<bool>,
    current: &mut Option<Current>,
    link: &SessionLink,
    live_slot: &LiveSlot,
) -> Result<(), AgentError> {
    // A job without a session stops at its limit even while the coordinator is unreachable.
    let give_up_at =
        current.as_ref().filter(|c| c.training()).and_then(|c| c.detached_since).map(|t| t + cfg.detached_timeout);
    let detached_too_long = async move {
        match give_up_at {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(detached_too_long);
    let too_long = || AgentError::Retry("no session with the coordinator within --detached-timeout".into());
    let client = tokio::select! {
        c = connect(&cfg.coordinator, cfg.token.as_deref(), cfg.tls_ca.as_deref()) => c.map_err(|e| AgentError::Retry(e.to_string()))?,
        _ = stopped(&mut stop) => return Ok(()),
        _ = &mut detached_too_long => return Err(too_long()),
    };
    let mut client = client;
    let (tx, rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let register = RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: cfg.worker_id.clone(),
        data_addr: advertise.to_string(),
        capabilities: Some(capabilities(cfg)),
    };
    // A job that outlived its session is claimed, with what it reported meanwhile.
    let claimed = match current.as_mut() {
        Some(c) => {
            c.drain();
            Some((c.id.clone(), c.attempt))
        }
        None => None,
    };
    let first = match current.as_ref() {
        Some(c) => worker_message::Msg::Rejoin(c.rejoin_request(register)),
        None => worker_message::Msg::Register(register),
    };
    let _ = tx.send(WorkerMessage { msg: Some(first) });
    let opened = tokio::select! {
        r = client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)) => r,
        _ = stopped(&mut stop) => return Ok(()),
        _ = &mut detached_too_long => return Err(too_long()),
    };
    let mut inbound = match opened {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let text = format!("registration refused: {}", printable(s.message()));
            return Err(match s.code() {
                tonic::Code::FailedPrecondition
                | tonic::Code::InvalidArgument
                | tonic::Code::Unauthenticated
                | tonic::Code::PermissionDenied => AgentError::Fatal(text),
                _ => AgentError::Retry(text),
            });
        }
    };

    let heartbeat_tx = tx.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEARTBEAT_EVERY).await;
            if heartbeat_tx
                .send(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat::default())) })
                .is_err()
            {
                return;
            }
        }
    });

    let mut open = Open {
        cfg,
        listener,
        link,
        live_slot,
        client,
        tx,
        claimed,
        // Replaced by the id the coordinator confirms.
        worker_id: if cvdist_common::spec::valid_name(&cfg.worker_id) {
            cfg.worker_id.clone()
        } else {
            format!("pid-{}", std::process::id())
        },
        attached: false,
    };
    let result = loop {
        let next = tokio::select! {
            m = inbound.message() => Next::Coordinator(m),
            r = next_report(current) => Next::Report(r),
            _ = stopped(&mut stop) => Next::Stop,
            _ = &mut detached_too_long, if !open.attached => Next::DetachedTooLong,
        };
        let msg = match next {
            Next::Stop => break Ok(()),
            Next::DetachedTooLong => break Err(too_long()),
            Next::Report(Some(report)) => {
                if let Some(c) = current.as_mut() {
                    let report = c.record(report);
                    if open.attached {
                        c.progress = None;
                        let _ = open.tx.send(report);
                    }
                }
                continue;
            }
            Next::Report(None) => {
                // The training thread has ended: collect it.
                if let Some(c) = current.as_mut() {
                    c.reports = None;
                    c.join(None).await;
                }
                continue;
            }
            Next::Coordinator(Ok(Some(m))) => m,
            Next::Coordinator(Ok(None)) => break Ok(()),
            Next::Coordinator(Err(s)) => break Err(AgentError::Retry(format!("session lost: {}", error_chain(&s)))),
        };
        match msg.msg {
            Some(coordinator_message::Msg::Registered(r)) => open.on_registered(r, current).await,
            Some(coordinator_message::Msg::Assignment(a)) => open.on_assignment(a, current).await?,
            Some(coordinator_message::Msg::Abort(ab)) => on_abort(&ab, current),
            None => {}
        }
    };
    heartbeat.abort();
    link.detach();
    result
}

/// What the handlers of a session share once the coordinator accepted it.
struct Open<'a> {
    cfg: &'a WorkerConfig,
    listener: &'a TcpListener,
    link: &'a SessionLink,
    live_slot: &'a LiveSlot,
    client: Client,
    /// The session's outbound messages.
    tx: mpsc::UnboundedSender<WorkerMessage>,
    /// The job this session's registration claimed: id, attempt.
    claimed: Option<(String, u32)>,
    /// Names this worker's own scratch folder.
    worker_id: String,
    /// Whether this session holds the current job: reports go out only then.
    attached: bool,
}

impl Open<'_> {
    /// The coordinator confirmed the registration: a claimed job is re-adopted (the
    /// coordinator gets what it may have missed) or stopped, the session takes over the
    /// job's uploads, and a checkpoint deferred while no session held the job goes now.
    async fn on_registered(&mut self, r: Registered, current: &mut Option<Current>) {
        info!(worker = %printable(&r.worker_id), "registered");
        // Uploads carry the session key to prove they come from this session.
        let session_key = r.session_key;
        // A path component: only a valid name is used.
        if cvdist_common::spec::valid_name(&r.worker_id) {
            self.worker_id = r.worker_id;
        }
        if let (Some((id, attempt)), Some(c)) = (&self.claimed, current.as_mut()) {
            if r.adopted {
                let away = c.detached_since.take().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                info!(job = %printable(id), attempt, away_s = away, reports = c.journal.len(),
                    "the coordinator re-adopted the running attempt; sending what it may have missed");
                for m in &c.journal {
                    let _ = self.tx.send(m.clone());
                }
                if let Some(p) = c.progress.take() {
                    let _ = self.tx.send(p);
                }
            } else {
                warn!(job = %printable(id), attempt, "the coordinator did not re-adopt the attempt; stopping it");
                c.stop("the coordinator did not re-adopt this attempt", None).await;
                *current = None;
            }
        }
        self.attached = true;
        self.link.attach(Attached { key: session_key.clone(), client: self.client.clone() });
        // A checkpoint written while no session held the job goes now, beside training.
        if let Some(d) = self.link.take_deferred() {
            if current.as_ref().is_some_and(|c| c.id == d.job_id && c.attempt == d.attempt) {
                spawn_deferred_upload(self.client.clone(), d, session_key);
            }
        }
    }

    /// Starts the assigned job on its own thread, after stopping the one before.
    async fn on_assignment(&mut self, a: Assignment, current: &mut Option<Current>) -> Result<(), AgentError> {
        // One job at a time: an aborted predecessor must have let go of the
        // device and the data-plane port before the next starts.
        if let Some(mut c) = current.take() {
            c.stop("superseded by a new assignment", None).await;
        }
        info!(job = %printable(&a.job_id), attempt = a.attempt, rank = a.rank, world = a.world_size, "assignment");
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let env = JobEnv {
            device: self.cfg.device,
            data: self.cfg.data.clone(),
            cache_dir: self.cfg.cache_dir.clone(),
            worker_id: self.worker_id.clone(),
            listener: self.listener.try_clone().map_err(|e| AgentError::Fatal(e.to_string()))?,
            client: self.client.clone(),
            runtime: tokio::runtime::Handle::current(),
            outbox: reports_tx,
            link: self.link.clone(),
            live: self.live_slot.clone(),
        };
        let control = JobControl::default();
        let mut job = Current::new(&a, control.clone(), reports);
        let handle = std::thread::Builder::new()
            .name(format!("job-{}", printable(&a.job_id)))
            .spawn(move || job::run(a, env, control))
            .map_err(|e| AgentError::Fatal(format!("cannot start the training thread: {e}")))?;
        job.handle = Some(handle);
        *current = Some(job);
        Ok(())
    }
}

/// Stops the current job if the abort names its attempt.
fn on_abort(ab: &Abort, current: &Option<Current>) {
    if let Some(c) = current.as_ref() {
        if c.id == ab.job_id && c.attempt == ab.attempt {
            info!(job = %printable(&c.id), reason = %printable(&ab.reason), "abort");
            c.control.request_stop(&ab.reason);
        }
    }
}

/// Uploads a checkpoint written while no session held the job, beside training; a failure
/// only warns, since a newer checkpoint of the job replaces it.
fn spawn_deferred_upload(mut client: Client, d: Deferred, session_key: String) {
    tokio::spawn(async move {
        let name = d.state.name();
        match transfer::upload_checkpoint(&mut client, &d.job_id, d.attempt, &session_key, &d.json, &d.state).await {
            Ok(()) => info!(checkpoint = %name, "deferred checkpoint uploaded"),
            // A newer checkpoint of the job replaces it.
            Err(e) => warn!(checkpoint = %name, error = %e, "deferred checkpoint upload failed"),
        }
    });
}
