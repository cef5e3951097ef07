//! The worker's life with a coordinator: connect (with backoff), register, wait for
//! assignments, run them one at a time, heartbeat, and come back after any disconnect.

pub mod job;
pub mod transfer;

use cvdist_common::client::{connect, error_chain};
use cvdist_common::proto::{
    coordinator_message, worker_message, Heartbeat, RegisterRequest, WorkerCapabilities, WorkerMessage,
};
use cvdist_common::text::printable;
use cvdist_common::version::PROTOCOL_VERSION;
use job::{JobControl, JobEnv};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tch::Device;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
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
        nccl: crate::collective::nccl::available().is_ok(),
        has_local_data: cfg.data.is_some(),
    }
}

/// Resolves once `stop` has fired.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves the coordinator until a fatal error or until `stop` resolves (SIGTERM, Ctrl-C):
/// then the running job is stopped, the session closed, and `Ok` returned. Reconnects
/// after every other failure.
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
    let mut backoff = Duration::from_millis(250);
    loop {
        let outcome = session(&cfg, &listener, &advertise, stop_rx.clone()).await;
        if *stop_rx.borrow() {
            info!("worker stopped");
            return Ok(());
        }
        match outcome {
            Err(AgentError::Fatal(e)) => return Err(AgentError::Fatal(e)),
            Err(AgentError::Retry(e)) => {
                warn!("{e}; retrying in {:.1}s", backoff.as_secs_f64());
            }
            Ok(()) => {
                // The coordinator closed the session cleanly (e.g. it is restarting).
                backoff = Duration::from_millis(250);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop_rx) => {
                info!("worker stopped");
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn session(
    cfg: &WorkerConfig,
    listener: &std::net::TcpListener,
    advertise: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut client = tokio::select! {
        c = connect(&cfg.coordinator, cfg.token.as_deref(), cfg.tls_ca.as_deref()) => c.map_err(|e| AgentError::Retry(e.to_string()))?,
        _ = stopped(&mut stop) => return Ok(()),
    };
    let (tx, rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let register = RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: cfg.worker_id.clone(),
        data_addr: advertise.to_string(),
        capabilities: Some(capabilities(cfg)),
    };
    let _ = tx.send(WorkerMessage { msg: Some(worker_message::Msg::Register(register)) });
    let opened = tokio::select! {
        r = client.worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)) => r,
        _ = stopped(&mut stop) => return Ok(()),
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

    let mut running: Option<(String, u32, JobControl, std::thread::JoinHandle<()>)> = None;
    // The training state a failed attempt leaves for the next one (issue 14).
    let live = crate::train::live_state::LiveSlot::default();
    // Names this worker's own scratch folder; replaced by the id the coordinator confirms.
    let mut worker_id = if cvdist_common::spec::valid_name(&cfg.worker_id) {
        cfg.worker_id.clone()
    } else {
        format!("pid-{}", std::process::id())
    };
    // Sent in `Registered`; uploads carry it to prove they come from this session.
    let mut session_key = String::new();
    let result = loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            _ = stopped(&mut stop) => break Ok(()),
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(s) => break Err(AgentError::Retry(format!("session lost: {}", error_chain(&s)))),
        };
        match msg.msg {
            Some(coordinator_message::Msg::Registered(r)) => {
                info!(worker = %printable(&r.worker_id), "registered");
                session_key = r.session_key;
                // A path component: only a valid name is used.
                if cvdist_common::spec::valid_name(&r.worker_id) {
                    worker_id = r.worker_id;
                }
            }
            Some(coordinator_message::Msg::Assignment(a)) => {
                // One job at a time: an aborted predecessor must have let go of the
                // device and the data-plane port before the next starts.
                if let Some((_, _, control, handle)) = running.take() {
                    control.request_stop("superseded by a new assignment");
                    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
                }
                info!(job = %printable(&a.job_id), attempt = a.attempt, rank = a.rank, world = a.world_size, "assignment");
                let env = JobEnv {
                    device: cfg.device,
                    data: cfg.data.clone(),
                    cache_dir: cfg.cache_dir.clone(),
                    worker_id: worker_id.clone(),
                    listener: listener.try_clone().map_err(|e| AgentError::Fatal(e.to_string()))?,
                    client: client.clone(),
                    runtime: tokio::runtime::Handle::current(),
                    outbox: tx.clone(),
                    session_key: session_key.clone(),
                    live: live.clone(),
                };
                let control = JobControl::default();
                let (id, attempt) = (a.job_id.clone(), a.attempt);
                let c = control.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("job-{}", printable(&id)))
                    .spawn(move || job::run(a, env, c))
                    .map_err(|e| AgentError::Fatal(format!("cannot start the training thread: {e}")))?;
                running = Some((id, attempt, control, handle));
            }
            Some(coordinator_message::Msg::Abort(ab)) => {
                if let Some((id, attempt, control, _)) = &running {
                    if *id == ab.job_id && *attempt == ab.attempt {
                        info!(job = %printable(id), reason = %printable(&ab.reason), "abort");
                        control.request_stop(&ab.reason);
                    }
                }
            }
            None => {}
        }
        if running.as_ref().is_some_and(|(_, _, c, _)| c.done.load(Ordering::SeqCst)) {
            if let Some((_, _, _, handle)) = running.take() {
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
            }
        }
    };
    heartbeat.abort();
    let shutting_down = *stop.borrow();
    // Without a coordinator the group cannot recover from failures or store checkpoints:
    // stop, and let the (re)started coordinator re-form the group from its checkpoint.
    if let Some((id, _, control, handle)) = running.take() {
        control.request_stop(if shutting_down { "worker shutting down" } else { "lost the coordinator" });
        let join = tokio::task::spawn_blocking(move || handle.join());
        if shutting_down {
            if tokio::time::timeout(STOP_JOB_WAIT, join).await.is_err() {
                warn!(job = %id, "the job did not stop within {}s; leaving anyway", STOP_JOB_WAIT.as_secs());
            }
        } else {
            let _ = join.await;
        }
    }
    result
}
