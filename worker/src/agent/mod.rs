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

mod config;
pub mod control;
mod current;
mod env;
mod failure;
pub mod job;
pub mod link;
mod observer;
mod resume;
mod session;
pub mod transfer;

use crate::train::live_state::LiveSlot;
use current::Current;
use cvdist_common::text::printable;
use link::SessionLink;
use session::session;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

pub use config::{capabilities, WorkerConfig, DEFAULT_DETACHED_TIMEOUT};

const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// While a job trains without a session, the longest wait between reconnection attempts: a
/// restarted coordinator waits a bounded window (three heartbeat timeouts, 30 s by default)
/// for the attempt's workers, so they must be back well within it.
pub const DETACHED_BACKOFF: Duration = Duration::from_secs(1);
/// On SIGTERM/Ctrl-C, how long the running job gets to stop before the process leaves
/// anyway. An abort reaches every wait within a second; only a single long libtorch call
/// (a big convolution) can take longer, and the process must still exit within 10 s.
const STOP_JOB_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Retrying cannot help (e.g. incompatible versions); the process should exit.
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    Retry(String),
}

/// Resolves once `stop` has fired.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
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
    let live_slot = LiveSlot::default();
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
