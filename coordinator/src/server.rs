//! Runs the coordinator: gRPC service with token checks (client and worker roles), optional (mutual) TLS, the
//! standard health service for Kubernetes probes, the scheduler tick, and the Prometheus
//! endpoint (`GET /metrics`, encoded by `prometheus-client`, served by hyper).

use crate::auth::TokenCheck;
use crate::service::Service;
use crate::state::{Coordinator, StateConfig};
use crate::store::{Store, StoreError};
use anyhow::{bail, Context};
use cvdist_common::auth;
use cvdist_common::proto::coordinator_server::CoordinatorServer;
use cvdist_common::version::MAX_MESSAGE_BYTES;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

/// How long a shutdown waits for open RPCs (an upload, a dataset stream) to finish after
/// the worker sessions and watch streams were closed; then the rest are cut off, so a
/// coordinator always stops within a few seconds of SIGTERM or Ctrl-C.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Everything the coordinator binary is configured with.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    /// The client token: users and the submit Job (job management RPCs only).
    pub token: Option<String>,
    /// The worker credential: registration, checkpoints, the dataset (worker RPCs only).
    pub worker_token: Option<String>,
    /// Explicit opt-out: listen on a non-loopback address without a token or without TLS.
    pub allow_insecure_remote: bool,
    pub tls: Option<TlsFiles>,
    pub data_dir: Option<PathBuf>,
    pub heartbeat_timeout: Duration,
    pub metrics_listen: Option<SocketAddr>,
    /// Checkpoints kept per job: the K newest (the final one is the newest) plus the one a
    /// recovery resumes from; 0 keeps all. Older ones are deleted once a newer is stored.
    pub keep_checkpoints: usize,
    /// An upload stream that sends nothing for this long is dropped with its temp file.
    pub upload_idle_timeout: Duration,
}

/// Default of `--keep-checkpoints`: enough to resume from the newest and still have two
/// older ones should the newest turn out unusable, at ~3x one checkpoint's disk space.
pub const DEFAULT_KEEP_CHECKPOINTS: usize = 3;

/// Refuses a configuration that would expose an unauthenticated coordinator, let the
/// client token admit workers, or send tokens over the network in plaintext.
pub fn check_exposure(listen: SocketAddr, cfg: &CoordinatorConfig) -> anyhow::Result<()> {
    let remote = !listen.ip().is_loopback();
    if cfg.token.is_none() {
        if remote && !cfg.allow_insecure_remote {
            bail!(
                "refusing to listen on {listen} without a token: set CVDIST_TOKEN or --token-file, \
                 or pass --allow-insecure-remote if the network is trusted"
            );
        }
        warn!("no token configured: any local process can control this coordinator");
    }
    match (&cfg.token, &cfg.worker_token) {
        (Some(_), None) => bail!(
            "a client token is set but no worker credential: set CVDIST_WORKER_TOKEN or --worker-token-file to a \
             different secret for the workers (the client token does not admit workers)"
        ),
        (Some(t), Some(w)) if auth::constant_time_eq(t.as_bytes(), w.as_bytes()) => bail!(
            "the worker credential (CVDIST_WORKER_TOKEN / --worker-token-file) must differ from the client token (CVDIST_TOKEN / --token-file)"
        ),
        _ => {}
    }
    if remote && cfg.tls.is_none() {
        if !cfg.allow_insecure_remote {
            bail!(
                "refusing to listen on {listen} without TLS: tokens would cross the network in plaintext; \
                 pass --tls-cert and --tls-key, or --allow-insecure-remote if the network itself is trusted and encrypted"
            );
        }
        warn!(%listen, "listening without TLS (--allow-insecure-remote): tokens cross the network in plaintext");
    }
    Ok(())
}

/// Binds the metrics address a user asked for; failing to is fatal, like `--listen`.
pub async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))
}

/// Serves on `listener` until `shutdown` resolves, then stops within [`SHUTDOWN_GRACE`]
/// (plus the time to close the store). Fails before serving if the metrics address
/// cannot be bound.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    check_exposure(addr, &cfg)?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(bind_metrics(a).await?),
        None => None,
    };
    // Loading reads and rewrites job records: on the blocking pool, as every store write is.
    let (state_dir, heartbeat_timeout) = (cfg.state_dir.clone(), cfg.heartbeat_timeout);
    let loaded = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let store = Store::open(&state_dir)?;
        Coordinator::new(store, StateConfig { heartbeat_timeout })
    })
    .await
    .context("loading the coordinator's state")?;
    // StoreError already names the path and the cause; more context would repeat it.
    let state = loaded?;
    let recovered = state.job_count();
    info!(%addr, state_dir = %cfg.state_dir.display(), jobs = recovered, "coordinator listening");

    let ticker = state.clone();
    let tick_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = ticker.wake.notified() => {}
            }
            // A pass commits what it decides to the store: on the blocking pool, one pass at
            // a time (the next waits for this one).
            let pass = ticker.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || pass.tick()).await {
                warn!(error = %e, "a scheduler pass did not complete");
            }
        }
    });
    let metrics_task = metrics_listener.map(|l| tokio::spawn(serve_metrics(l, state.clone())));

    let service = Service {
        state: state.clone(),
        data_dir: cfg.data_dir.clone(),
        keep_checkpoints: cfg.keep_checkpoints,
        upload_idle_timeout: cfg.upload_idle_timeout,
    };
    let check = TokenCheck::new(cfg.token.clone(), cfg.worker_token.clone());
    let api = CoordinatorServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let api = tonic::service::interceptor::InterceptedService::new(api, check);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<Service>>().await;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = &cfg.tls {
        let cert =
            std::fs::read(&tls.cert).with_context(|| format!("reading TLS certificate {}", tls.cert.display()))?;
        let key = std::fs::read(&tls.key).with_context(|| format!("reading TLS key {}", tls.key.display()))?;
        let mut tls_cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &tls.client_ca {
            let ca = std::fs::read(ca).with_context(|| format!("reading client CA {}", ca.display()))?;
            tls_cfg = tls_cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls_cfg).context("configuring TLS")?;
    }
    // Nagle off, as tonic's own listener would do: with it, a response written in two
    // pieces waits for the client's delayed ACK (~40 ms per status call under load).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let closer = state.clone();
    let shutdown = async move {
        shutdown.await;
        info!("shutting down: closing worker sessions and watch streams");
        closer.shut_down();
        let _ = signalled_tx.send(());
    };
    let server = builder.add_service(health_service).add_service(api).serve_with_incoming_shutdown(incoming, shutdown);
    let result = tokio::select! {
        r = server => r,
        // Graceful shutdown waits for every open RPC; bound that wait.
        _ = async {
            if signalled_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            warn!("RPCs still open {}s after shutdown began; closing them", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    };
    tick_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    // Connections cut off above may still hold the state; the store (and its file lock)
    // is released when they are dropped with the runtime. Every state change was already
    // committed, so nothing is lost either way.
    drop(state);
    result.context("gRPC server")?;
    info!("coordinator stopped");
    Ok(())
}

/// How long a metrics connection may take to send its request head; a silent connection is
/// closed after this (as the hand-written server before it did).
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` over HTTP/1.1 with hyper, one request per connection (the response
/// says `connection: close`, so scrapers and `curl` see the end of the body at EOF).
async fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<Coordinator>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics on /metrics");
    }
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin on accept.
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let response = metrics_response(&state, req.method(), req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            // Bad requests get hyper's 400 and the connection closes; nothing to log.
            let _ = tokio::time::timeout(METRICS_HEADER_TIMEOUT * 6, conn).await;
        });
    }
}

/// Content type of the OpenMetrics text format `prometheus-client` encodes (Prometheus
/// scrapes it natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The answer to one HTTP request on the metrics port: `GET` (or `HEAD`) `/metrics` gets the
/// metrics, any other path 404, any other method on `/metrics` 405 with `allow: GET, HEAD`.
pub fn metrics_response(
    state: &Coordinator,
    method: &hyper::Method,
    path: &str,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use hyper::{header, Method, Response, StatusCode};
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(http_body_util::Full::new(hyper::body::Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if path != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are served on /metrics\n");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET /metrics\n");
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = Response::new(http_body_util::Full::new(hyper::body::Bytes::from(render_metrics(state))));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(METRICS_CONTENT_TYPE));
    r
}

/// The coordinator's metrics in the OpenMetrics text format, from a snapshot of
/// [`Coordinator::stats`]. A fresh `prometheus-client` registry per scrape: every value is a
/// snapshot the state already keeps, so nothing needs to be updated between scrapes.
pub fn render_metrics(state: &Coordinator) -> String {
    render_stats(&state.stats())
}

fn render_stats(s: &crate::state::Stats) -> String {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
    use std::sync::atomic::AtomicU64;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct JobLabels {
        state: &'static str,
    }
    let mut reg = prometheus_client::registry::Registry::default();
    let jobs = Family::<JobLabels, Gauge<u64, AtomicU64>>::default();
    // Every state is listed, also at 0, so a dashboard's series never vanish.
    for st in ["queued", "running", "recovering", "succeeded", "failed", "cancelled"] {
        jobs.get_or_create(&JobLabels { state: st }).set(s.jobs_by_state.get(st).copied().unwrap_or(0));
    }
    reg.register("cvdist_jobs", "Jobs by state", jobs);
    let gauge = |v: u64| {
        let g = Gauge::<u64, AtomicU64>::default();
        g.set(v);
        g
    };
    let float = |v: f64| {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(v);
        g
    };
    reg.register("cvdist_workers", "Registered workers", gauge(s.workers));
    reg.register("cvdist_workers_busy", "Workers in a job", gauge(s.busy_workers));
    // Registered as `cvdist_restarts`; the encoder adds the `_total` counters carry.
    let restarts = Counter::<u64>::default();
    restarts.inc_by(s.restarts);
    reg.register("cvdist_restarts", "Job attempts lost to failures", restarts);
    let recoveries = Counter::<u64>::default();
    recoveries.inc_by(s.recoveries);
    reg.register("cvdist_recoveries", "Failed attempts re-formed from the newest checkpoint", recoveries);
    let replayed = Counter::<u64>::default();
    replayed.inc_by(s.steps_replayed);
    reg.register("cvdist_steps_replayed", "Training steps computed again after recoveries", replayed);
    reg.register("cvdist_images_per_second", "Training throughput of running jobs", float(s.images_per_sec));
    reg.register("cvdist_step_seconds", "Latest step time", float(s.step_seconds));
    reg.register("cvdist_allreduce_seconds", "Latest all-reduce time per step", float(s.allreduce_seconds));
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct RunningJob {
        job: String,
    }
    let world = Family::<RunningJob, Gauge<u64, AtomicU64>>::default();
    for (job, size) in &s.world_sizes {
        world.get_or_create(&RunningJob { job: job.clone() }).set(*size);
    }
    reg.register("cvdist_job_world_size", "Workers in each running job's group", world);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_names_and_values() {
        let mut s = crate::state::Stats::default();
        s.jobs_by_state.insert("running", 2);
        s.jobs_by_state.insert("succeeded", 5);
        s.workers = 3;
        s.busy_workers = 2;
        s.restarts = 4;
        s.recoveries = 3;
        s.steps_replayed = 17;
        s.images_per_sec = 1234.5;
        s.step_seconds = 0.25;
        s.allreduce_seconds = 0.0;
        s.world_sizes.insert("j0002-resnet50".into(), 8);
        let text = render_stats(&s);
        for line in [
            "# TYPE cvdist_jobs gauge",
            "cvdist_jobs{state=\"queued\"} 0",
            "cvdist_jobs{state=\"running\"} 2",
            "cvdist_jobs{state=\"succeeded\"} 5",
            "cvdist_jobs{state=\"cancelled\"} 0",
            "# HELP cvdist_workers Registered workers.",
            "cvdist_workers 3",
            "cvdist_workers_busy 2",
            "# TYPE cvdist_restarts counter",
            "cvdist_restarts_total 4",
            "# TYPE cvdist_recoveries counter",
            "cvdist_recoveries_total 3",
            "cvdist_steps_replayed_total 17",
            "cvdist_images_per_second 1234.5",
            "cvdist_step_seconds 0.25",
            "cvdist_allreduce_seconds 0.0",
            "cvdist_job_world_size{job=\"j0002-resnet50\"} 8",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
