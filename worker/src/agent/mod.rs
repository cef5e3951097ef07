//! The worker's life with a coordinator: connect (with backoff), register, wait for
//! assignments, run them one at a time, heartbeat, and come back after any disconnect.
//!
//! A job outlives the session it was assigned on: when the session is lost (the
//! coordinator restarted, say) the job keeps training, since its ring needs no
//! coordinator; its reports wait, the worker reconnects at least every
//! [`DETACHED_BACKOFF`], and re-registers with a `RejoinRequest` claiming the attempt. A
//! coordinator that re-adopts it gets the reports it may have missed ([`Current`]'s journal)
//! and the checkpoint uploads that waited (`link.rs`); one that does not makes the worker
//! stop the job. After `--detached-timeout` without a session the job stops on its own.

pub mod job;
pub mod link;
pub mod transfer;

use cvdist_common::client::{connect, error_chain};
use cvdist_common::proto::{
    coordinator_message, job_report, worker_message, CoordinatorMessage, Heartbeat, RegisterRequest, RejoinRequest,
    WorkerCapabilities, WorkerMessage,
};
use cvdist_common::rejoin;
use cvdist_common::text::printable;
use cvdist_common::version::PROTOCOL_VERSION;
use job::{JobControl, JobEnv};
use link::{Attached, SessionLink};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// While a job trains without a session, the longest wait between reconnection attempts: a
/// restarted coordinator waits a bounded window (three heartbeat timeouts, 30 s by default)
/// for the attempt's workers, so they must be back well within it.
pub const DETACHED_BACKOFF: Duration = Duration::from_secs(1);
/// The default of `--detached-timeout`: how long a job keeps training without a session
/// with the coordinator before the worker stops it. Long enough for a coordinator restart
/// by hand or by an orchestrator (a rescheduled pod, an image pull: a minute or two); short
/// enough that training unobserved — no checkpoint stored, no metrics recorded — is bounded,
/// and shorter than the default collective timeout (600 s).
pub const DEFAULT_DETACHED_TIMEOUT: Duration = Duration::from_secs(300);
/// On SIGTERM/Ctrl-C, how long the running job gets to stop before the process leaves
/// anyway. An abort reaches every wait within a second; only a single long libtorch call
/// (a big convolution) can take longer, and the process must still exit within 10 s.
const STOP_JOB_WAIT: Duration = Duration::from_secs(5);

/// Everything `cvdist-worker worker` is configured with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub worker_id: String,
    pub device: Device,
    pub threads: usize,
    pub data: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub data_listen: SocketAddr,
    pub advertise_addr: Option<String>,
    /// How long a running job keeps training without a session with the coordinator.
    pub detached_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Retrying cannot help (e.g. incompatible versions); the process should exit.
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    Retry(String),
}

pub fn capabilities(cfg: &WorkerConfig) -> WorkerCapabilities {
    let (device, gpu_name) = match cfg.device {
        Device::Cuda(k) => (format!("cuda:{k}"), "CUDA device".to_string()),
        _ => ("cpu".to_string(), String::new()),
    };
    WorkerCapabilities {
        device,
        gpu_name,
        gpu_memory_bytes: 0,
        threads: cfg.threads as u32,
        nccl: cfg.device.is_cuda() && crate::collective::c10d::nccl_built(),
        has_local_data: cfg.data.is_some(),
    }
}

/// Resolves once `stop` has fired.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The job this worker runs, or ran last, kept across sessions because a job outlives the
/// session it was assigned on.
struct Current {
    id: String,
    attempt: u32,
    rank: u32,
    world_size: u32,
    /// This worker's id in the attempt (the coordinator picks one when `--worker-id` is
    /// empty): a re-registration claims the rank under it.
    member_id: String,
    /// The attempt's `Assignment.session_secret`: signs the claim of a re-registration.
    secret: String,
    control: JobControl,
    /// The training thread, until it has been joined.
    handle: Option<std::thread::JoinHandle<()>>,
    /// What the training thread reports; `None` once it hung up.
    reports: Option<mpsc::UnboundedReceiver<WorkerMessage>>,
    /// This attempt's epoch, finished and failed reports, sent again after a re-registration:
    /// one sent just before a session broke may never have arrived, and the reports made
    /// while no session was up arrived nowhere. The coordinator ignores copies.
    journal: Vec<WorkerMessage>,
    /// The newest progress report not sent yet.
    progress: Option<WorkerMessage>,
    /// The newest position reported: epoch, steps done in it.
    position: (u32, u64),
    /// Since when the job has had no session with the coordinator.
    detached_since: Option<Instant>,
}

impl Current {
    /// Whether the training thread is still running.
    fn training(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Notes a report of the training thread (journal, position) and returns it for sending.
    fn record(&mut self, msg: WorkerMessage) -> WorkerMessage {
        if let Some(worker_message::Msg::Report(r)) = &msg.msg {
            match &r.kind {
                Some(job_report::Kind::Progress(p)) => {
                    self.position = self.position.max((p.epoch, p.step));
                    self.progress = Some(msg.clone());
                }
                Some(job_report::Kind::Epoch(m)) => {
                    self.position = self.position.max((m.epoch + 1, 0));
                    self.journal.push(msg.clone());
                }
                Some(job_report::Kind::Finished(_) | job_report::Kind::Failed(_)) => self.journal.push(msg.clone()),
                // Not journaled: sent again after a coordinator restart it would move the
                // attempt's start back to where the group began.
                Some(job_report::Kind::Resumed(r)) => self.position = self.position.max((r.epoch, r.step)),
                None => {}
            }
        }
        msg
    }

    /// Takes in every report waiting while no session was up.
    fn drain(&mut self) {
        while let Some(rx) = self.reports.as_mut() {
            match rx.try_recv() {
                Ok(msg) => {
                    self.record(msg);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.reports = None,
            }
        }
    }

    /// The first message of a session while this job exists: a registration claiming it.
    fn rejoin_request(&self, mut register: RegisterRequest) -> RejoinRequest {
        register.worker_id = self.member_id.clone();
        let claim = rejoin::Claim {
            job_id: &self.id,
            attempt: self.attempt,
            rank: self.rank,
            world_size: self.world_size,
            worker_id: &register.worker_id,
        };
        let proof = rejoin::proof(&self.secret, &claim);
        RejoinRequest {
            job_id: self.id.clone(),
            attempt: self.attempt,
            rank: self.rank,
            world_size: self.world_size,
            epoch: self.position.0,
            step: self.position.1,
            proof,
            register: Some(register),
        }
    }

    /// Joins the training thread, waiting at most `wait` (forever when `None`); returns
    /// whether it ended in time.
    async fn join(&mut self, wait: Option<Duration>) -> bool {
        let Some(handle) = self.handle.take() else { return true };
        let join = tokio::task::spawn_blocking(move || handle.join());
        match wait {
            Some(d) => tokio::time::timeout(d, join).await.is_ok(),
            None => {
                let _ = join.await;
                true
            }
        }
    }

    /// Stops the job and waits for its thread (see [`Current::join`]).
    async fn stop(&mut self, reason: &str, wait: Option<Duration>) {
        if self.training() {
            info!(job = %printable(&self.id), attempt = self.attempt, reason, "stopping the job");
        }
        self.control.request_stop(reason);
        if !self.join(wait).await {
            warn!(job = %printable(&self.id), "the job did not stop within {}s; leaving anyway", wait.unwrap_or_default().as_secs());
        }
    }
}

/// The next report of the running job's thread; pending when there is none.
async fn next_report(current: &mut Option<Current>) -> Option<WorkerMessage> {
    match current.as_mut().and_then(|c| c.reports.as_mut()) {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves the coordinator until a fatal error or until `stop` resolves (SIGTERM, Ctrl-C):
/// then the running job is stopped, the session closed, and `Ok` returned. Reconnects
/// after every other failure; a running job keeps training meanwhile, for at most
/// `--detached-timeout`.
pub async fn run(
    cfg: WorkerConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let listener = std::net::TcpListener::bind(cfg.data_listen)
        .map_err(|e| AgentError::Fatal(format!("cannot listen for peers on {}: {e}", cfg.data_listen)))?;
    let bound = listener.local_addr().map_err(|e| AgentError::Fatal(e.to_string()))?;
    let advertise = match &cfg.advertise_addr {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            return Err(AgentError::Fatal(format!(
                "--data-listen {bound} is a wildcard address; pass --advertise-addr HOST:PORT so peers can reach this worker"
            )))
        }
        None => bound.to_string(),
    };
    info!(data_plane = %bound, advertise = %advertise, "worker starting");
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        stop_tx.send_replace(true);
        // Keep the sender: a closed channel would read as "never stops".
        std::future::pending::<()>().await;
    });
    if let Some(w) = cvdist_common::client::plaintext_token_warning(&cfg.coordinator, cfg.token.as_deref()) {
        warn!("{w}");
    }
    let link = SessionLink::new(cfg.detached_timeout);
    // The training state a failed attempt leaves for the next one, so it can continue from
    // memory; it outlives sessions like the job does.
    let live_slot = crate::train::live_state::LiveSlot::default();
    let mut current: Option<Current> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        let outcome = session(&cfg, &listener, &advertise, stop_rx.clone(), &mut current, &link, &live_slot).await;
        link.detach();
        if *stop_rx.borrow() {
            if let Some(c) = current.as_mut() {
                c.stop("worker shutting down", Some(STOP_JOB_WAIT)).await;
            }
            info!("worker stopped");
            return Ok(());
        }
        if let Err(AgentError::Fatal(e)) = outcome {
            if let Some(c) = current.as_mut() {
                c.stop("the coordinator refused this worker", None).await;
            }
            return Err(AgentError::Fatal(e));
        }
        // The data plane needs no coordinator: the job trains on, for a bounded time.
        if let Some(c) = current.as_mut().filter(|c| c.training()) {
            let since = *c.detached_since.get_or_insert_with(|| {
                info!(job = %printable(&c.id), attempt = c.attempt, limit_s = cfg.detached_timeout.as_secs(),
                    "no session with the coordinator; the job keeps training and reports when it is back");
                Instant::now()
            });
            if since.elapsed() >= cfg.detached_timeout {
                let reason = format!(
                    "no session with the coordinator for {}s (--detached-timeout)",
                    cfg.detached_timeout.as_secs()
                );
                warn!(job = %printable(&c.id), "{reason}; stopping the job");
                c.stop(&reason, None).await;
                // Stopped unobserved: nothing to claim; a restarted coordinator recovers it.
                current = None;
            }
        }
        match outcome {
            Err(AgentError::Retry(e)) => warn!("{e}; retrying in {:.1}s", backoff.as_secs_f64()),
            // The coordinator closed the session cleanly (e.g. it is restarting).
            _ => backoff = Duration::from_millis(250),
        }
        // A job that trains, or that ended while detached, has something to report soon.
        let pressing = current.as_ref().is_some_and(|c| c.training() || c.detached_since.is_some());
        let wait = if pressing { backoff.min(DETACHED_BACKOFF) } else { backoff };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut stop_rx) => {
                if let Some(c) = current.as_mut() {
                    c.stop("worker shutting down", Some(STOP_JOB_WAIT)).await;
                }
                info!("worker stopped");
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

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
async fn session(
    cfg: &WorkerConfig,
    listener: &std::net::TcpListener,
    advertise: &str,
    mut stop: watch::Receiver<bool>,
    current: &mut Option<Current>,
    link: &SessionLink,
    live_slot: &crate::train::live_state::LiveSlot,
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

    // Names this worker's own scratch folder; replaced by the id the coordinator confirms.
    let mut worker_id = if cvdist_common::spec::valid_name(&cfg.worker_id) {
        cfg.worker_id.clone()
    } else {
        format!("pid-{}", std::process::id())
    };
    // Whether this session holds the current job: reports go out only then.
    let mut live = false;
    let result = loop {
        let next = tokio::select! {
            m = inbound.message() => Next::Coordinator(m),
            r = next_report(current) => Next::Report(r),
            _ = stopped(&mut stop) => Next::Stop,
            _ = &mut detached_too_long, if !live => Next::DetachedTooLong,
        };
        let msg = match next {
            Next::Stop => break Ok(()),
            Next::DetachedTooLong => break Err(too_long()),
            Next::Report(Some(report)) => {
                if let Some(c) = current.as_mut() {
                    let report = c.record(report);
                    if live {
                        c.progress = None;
                        let _ = tx.send(report);
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
            Some(coordinator_message::Msg::Registered(r)) => {
                info!(worker = %printable(&r.worker_id), "registered");
                // Uploads carry the session key to prove they come from this session.
                let session_key = r.session_key;
                // A path component: only a valid name is used.
                if cvdist_common::spec::valid_name(&r.worker_id) {
                    worker_id = r.worker_id;
                }
                if let (Some((id, attempt)), Some(c)) = (&claimed, current.as_mut()) {
                    if r.adopted {
                        let away = c.detached_since.take().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                        info!(job = %printable(id), attempt, away_s = away, reports = c.journal.len(),
                            "the coordinator re-adopted the running attempt; sending what it may have missed");
                        for m in &c.journal {
                            let _ = tx.send(m.clone());
                        }
                        if let Some(p) = c.progress.take() {
                            let _ = tx.send(p);
                        }
                    } else {
                        warn!(job = %printable(id), attempt, "the coordinator did not re-adopt the attempt; stopping it");
                        c.stop("the coordinator did not re-adopt this attempt", None).await;
                        *current = None;
                    }
                }
                live = true;
                link.attach(Attached { key: session_key.clone(), client: client.clone() });
                // A checkpoint written while no session held the job goes now, beside training.
                if let Some(d) = link.take_deferred() {
                    if current.as_ref().is_some_and(|c| c.id == d.job_id && c.attempt == d.attempt) {
                        let mut client = client.clone();
                        tokio::spawn(async move {
                            let name = d.state.name();
                            match transfer::upload_checkpoint(
                                &mut client,
                                &d.job_id,
                                d.attempt,
                                &session_key,
                                &d.json,
                                &d.state,
                            )
                            .await
                            {
                                Ok(()) => info!(checkpoint = %name, "deferred checkpoint uploaded"),
                                // A newer checkpoint of the job replaces it.
                                Err(e) => warn!(checkpoint = %name, error = %e, "deferred checkpoint upload failed"),
                            }
                        });
                    }
                }
            }
            Some(coordinator_message::Msg::Assignment(a)) => {
                // One job at a time: an aborted predecessor must have let go of the
                // device and the data-plane port before the next starts.
                if let Some(mut c) = current.take() {
                    c.stop("superseded by a new assignment", None).await;
                }
                info!(job = %printable(&a.job_id), attempt = a.attempt, rank = a.rank, world = a.world_size, "assignment");
                let (reports_tx, reports) = mpsc::unbounded_channel();
                let env = JobEnv {
                    device: cfg.device,
                    data: cfg.data.clone(),
                    cache_dir: cfg.cache_dir.clone(),
                    worker_id: worker_id.clone(),
                    listener: listener.try_clone().map_err(|e| AgentError::Fatal(e.to_string()))?,
                    client: client.clone(),
                    runtime: tokio::runtime::Handle::current(),
                    outbox: reports_tx,
                    link: link.clone(),
                    live: live_slot.clone(),
                };
                let control = JobControl::default();
                let mut job = Current {
                    id: a.job_id.clone(),
                    attempt: a.attempt,
                    rank: a.rank,
                    world_size: a.world_size,
                    member_id: a.peers.get(a.rank as usize).map(|p| p.worker_id.clone()).unwrap_or_default(),
                    secret: a.session_secret.clone(),
                    control: control.clone(),
                    handle: None,
                    reports: Some(reports),
                    journal: Vec::new(),
                    progress: None,
                    position: (a.start_epoch, a.start_step),
                    detached_since: None,
                };
                let handle = std::thread::Builder::new()
                    .name(format!("job-{}", printable(&a.job_id)))
                    .spawn(move || job::run(a, env, control))
                    .map_err(|e| AgentError::Fatal(format!("cannot start the training thread: {e}")))?;
                job.handle = Some(handle);
                *current = Some(job);
            }
            Some(coordinator_message::Msg::Abort(ab)) => {
                if let Some(c) = current.as_ref() {
                    if c.id == ab.job_id && c.attempt == ab.attempt {
                        info!(job = %printable(&c.id), reason = %printable(&ab.reason), "abort");
                        c.control.request_stop(&ab.reason);
                    }
                }
            }
            None => {}
        }
    };
    heartbeat.abort();
    link.detach();
    result
}
