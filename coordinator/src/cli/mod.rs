//! The `cvdist` command line: its clap definitions and one function per command. Control-
//! plane commands run here; commands that need libtorch (`worker`, `models`, `train`,
//! `eval`, `export`, `import`) are handed to the `cvdist-worker` binary ([`handover`]), so
//! this one stays free of libtorch. `main.rs` only parses, sets up logging and calls [`run`].

mod eval;
mod handover;
mod jobs;
mod runs;

use crate::follow::Connection;
use crate::local::{self, LocalRun};
use crate::server::{self, CoordinatorConfig, TlsFiles};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cvdist_common::args::JobArgs;
use cvdist_common::auth;
use cvdist_common::choices::{Dataset, DeviceRequest};
use cvdist_common::proto::JobSpec;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cvdist", version, about = "Distributed data-parallel training of CIFAR-10 classifiers")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The coordinator service logs at info level; every other command only its errors.
    pub fn is_service(&self) -> bool {
        matches!(self.command, Command::Coordinator(_))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train on this machine: embedded coordinator plus N local worker processes.
    #[command(
        after_help = "Examples:\n  cvdist local --model resnet20 --epochs 2 --workers 2 --data data/cifar10\n  cvdist local --model resnet18 --epochs 1 --dataset synthetic --out runs/smoke"
    )]
    Local(LocalArgs),
    /// Run the coordinator service.
    #[command(
        after_help = "Examples:\n  cvdist coordinator --listen 127.0.0.1:50051 --state-dir /var/lib/cvdist\n  CVDIST_TOKEN=... CVDIST_WORKER_TOKEN=... cvdist coordinator --listen 0.0.0.0:50051 --tls-cert tls.crt --tls-key tls.key --state-dir /state --data /data/cifar10"
    )]
    Coordinator(CoordinatorArgs),
    /// Submit a training job.
    #[command(
        after_help = "Examples:\n  cvdist submit --model resnet50 --epochs 200 --workers 8 --follow\n  cvdist submit --model resnet20 --epochs 5 --workers 2:4 --train-samples 5000"
    )]
    Submit(SubmitArgs),
    /// Show one job in detail, or the workers and jobs overview.
    #[command(after_help = "Examples:\n  cvdist status j0001-resnet50\n  cvdist status")]
    Status {
        job: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List jobs.
    #[command(after_help = "Example:\n  cvdist jobs --coordinator http://coordinator:50051")]
    Jobs {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a job's event log; with --follow, keep watching until it ends.
    #[command(after_help = "Example:\n  cvdist logs j0001-resnet50 --follow")]
    Logs {
        job: String,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel a queued or running job.
    #[command(after_help = "Example:\n  cvdist cancel j0001-resnet50")]
    Cancel {
        job: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Download CIFAR-10 (binary version) with checksum verification.
    #[command(after_help = "Example:\n  cvdist download --out data/cifar10")]
    Download {
        /// Destination; the files land in OUT/cifar-10-batches-bin/.
        #[arg(long, default_value = "data/cifar10")]
        out: PathBuf,
        #[arg(long, default_value = cvdist_common::download::DEFAULT_URL)]
        url: String,
        /// Expected MD5 of the archive.
        #[arg(long, default_value = cvdist_common::download::DEFAULT_MD5)]
        md5: String,
    },
    /// Chart one or more runs (run directories or job ids) and print a summary table.
    #[command(
        after_help = "Examples:\n  cvdist report runs/plain20 runs/resnet20 --out charts/\n  cvdist report j0001-resnet50 --out charts/ --coordinator http://coord:50051"
    )]
    Report {
        /// Run directories, or job ids to fetch from the coordinator.
        #[arg(required = true)]
        runs: Vec<String>,
        /// Where the PNG charts are written.
        #[arg(long, default_value = "report")]
        out: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Test accuracy, per-class accuracy and confusion matrix (PNG) of a checkpoint.
    #[command(
        after_help = "Example:\n  cvdist eval --checkpoint runs/r20/checkpoints/ckpt-e0005-s000000.json --data data/cifar10 --out eval/"
    )]
    Eval(EvalArgs),
    /// Export a checkpoint's weights as PyTorch-compatible safetensors (see `cvdist export --help`).
    #[command(disable_help_flag = true)]
    Export {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Import PyTorch safetensors weights as a checkpoint to warm-start from (see `cvdist import --help`).
    #[command(disable_help_flag = true)]
    Import {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a worker (see `cvdist worker --help`).
    #[command(disable_help_flag = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List the model zoo with parameters and multiply-adds (see `cvdist models --help`).
    #[command(disable_help_flag = true)]
    Models {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Train in this process without a coordinator (see `cvdist train --help`).
    #[command(disable_help_flag = true)]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// How a client command reaches the coordinator.
#[derive(Args, Clone)]
struct ConnArgs {
    /// Coordinator URL (http:// or https://).
    #[arg(long, env = "CVDIST_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// File holding the shared token (else $CVDIST_TOKEN).
    #[arg(long, env = "CVDIST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate to verify an https:// coordinator.
    #[arg(long, env = "CVDIST_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl ConnArgs {
    fn connection(&self) -> anyhow::Result<Connection> {
        let token = auth::load_token(self.token_file.as_deref())?;
        if let Some(w) = cvdist_common::client::plaintext_token_warning(&self.coordinator, token.as_deref()) {
            eprintln!("warning: {w}");
        }
        Ok(Connection { url: self.coordinator.clone(), token, tls_ca: self.tls_ca.clone() })
    }
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    job: JobArgs,
    /// N, or MIN:MAX for an elastic job.
    #[arg(long, default_value = "1")]
    workers: String,
    /// Watch the job with progress bars; the exit status reflects its outcome.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Number of local worker processes.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// CIFAR-10 directory (holding cifar-10-batches-bin/).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory for metrics, checkpoints and the summary.
    #[arg(long)]
    out: Option<PathBuf>,
    /// "cpu", "cuda" (worker k on cuda:(k mod GPU count)), "cuda:K" (all on one GPU) or
    /// "auto" (as cuda when CUDA is available, else cpu).
    #[arg(long, default_value_t = DeviceRequest::Auto)]
    device: DeviceRequest,
    /// Suppress progress bars.
    #[arg(long)]
    quiet: bool,
    /// Checkpoints kept in OUT/checkpoints: the K newest (the final one is the newest);
    /// 0 keeps all.
    #[arg(long, default_value_t = server::DEFAULT_KEEP_CHECKPOINTS)]
    keep_checkpoints: usize,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address for gRPC (clients, workers, health probes).
    #[arg(long, env = "CVDIST_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory for the job database, run directories and checkpoints.
    #[arg(long, env = "CVDIST_STATE_DIR")]
    state_dir: PathBuf,
    /// File holding the client token for users and the submit Job (else $CVDIST_TOKEN).
    #[arg(long, env = "CVDIST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// File holding the worker credential, a different secret that only workers hold
    /// (else $CVDIST_WORKER_TOKEN). Required whenever a client token is set.
    #[arg(long, env = "CVDIST_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// Allow listening on a non-loopback address without a token or without TLS (only
    /// where the network itself is trusted and encrypted).
    #[arg(long)]
    allow_insecure_remote: bool,
    /// CIFAR-10 directory served to workers that have no local copy.
    #[arg(long, env = "CVDIST_DATA")]
    data: Option<PathBuf>,
    #[arg(long, env = "CVDIST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CVDIST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "CVDIST_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Seconds without a heartbeat before a worker is declared lost.
    #[arg(long, env = "CVDIST_HEARTBEAT_TIMEOUT", default_value_t = 10)]
    heartbeat_timeout: u64,
    /// Address for Prometheus metrics over HTTP (GET /metrics).
    #[arg(long, env = "CVDIST_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Checkpoints kept per job: the K newest (the final one is the newest), older ones
    /// deleted once a newer one is stored; 0 keeps all.
    #[arg(long, env = "CVDIST_KEEP_CHECKPOINTS", default_value_t = server::DEFAULT_KEEP_CHECKPOINTS)]
    keep_checkpoints: usize,
    /// Seconds a checkpoint upload may send nothing before it is dropped.
    #[arg(long, env = "CVDIST_UPLOAD_IDLE_TIMEOUT", default_value_t = 60)]
    upload_idle_timeout: u64,
}

/// `cvdist eval` (run by `cvdist-worker eval`, charted here).
#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    eval: cvdist_common::args::EvalArgs,
    /// Directory for confusion.png and eval.json.
    #[arg(long, default_value = "eval")]
    out: PathBuf,
}

/// Runs the parsed command; returns the process's exit status.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Worker { args } => return handover::exec("worker", &args),
        Command::Models { args } => return handover::exec("models", &args),
        Command::Train { args } => return handover::exec("train", &args),
        Command::Export { args } => return handover::exec("export", &args),
        Command::Import { args } => return handover::exec("import", &args),
        Command::Eval(a) => return eval::run(a),
        Command::Download { out, url, md5 } => {
            let spec = cvdist_common::download::DownloadSpec { url, md5 };
            let dir = cvdist_common::download::download_cifar10(&out, &spec, true)?;
            println!("CIFAR-10 ready in {}", dir.display());
            return Ok(0);
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run_async(cli.command))
}

async fn run_async(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Coordinator(a) => serve(a).await,
        Command::Submit(a) => jobs::submit(a).await,
        Command::Status { job, conn } => jobs::status(job, &conn).await,
        Command::Jobs { conn } => jobs::list(&conn).await,
        Command::Logs { job, follow, conn } => jobs::logs(&job, follow, &conn).await,
        Command::Cancel { job, conn } => jobs::cancel(job, &conn).await,
        Command::Local(a) => run_local(a).await,
        Command::Report { runs, out, conn } => runs::report(&runs, &out, &conn).await,
        Command::Worker { .. }
        | Command::Models { .. }
        | Command::Train { .. }
        | Command::Download { .. }
        | Command::Eval { .. }
        | Command::Export { .. }
        | Command::Import { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// `cvdist coordinator`: serves until SIGINT or SIGTERM.
async fn serve(a: CoordinatorArgs) -> anyhow::Result<i32> {
    let token = auth::load_token(a.token_file.as_deref())?;
    let worker_token = auth::load_worker_token(a.worker_token_file.as_deref())?;
    let cfg = CoordinatorConfig {
        state_dir: a.state_dir,
        token,
        worker_token,
        allow_insecure_remote: a.allow_insecure_remote,
        tls: a.tls_cert.zip(a.tls_key).map(|(cert, key)| TlsFiles { cert, key, client_ca: a.tls_client_ca }),
        data_dir: a.data,
        heartbeat_timeout: Duration::from_secs(a.heartbeat_timeout.max(1)),
        metrics_listen: a.metrics_listen,
        keep_checkpoints: a.keep_checkpoints,
        upload_idle_timeout: Duration::from_secs(a.upload_idle_timeout.max(1)),
    };
    server::check_exposure(a.listen, &cfg)?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    server::serve(listener, cfg, async {
        let _ = shutdown_signal().await;
    })
    .await?;
    Ok(0)
}

/// `cvdist local`: an embedded coordinator and N worker processes for one job.
async fn run_local(a: LocalArgs) -> anyhow::Result<i32> {
    // `--workers 0` has always meant one worker.
    let workers = a.workers.max(1);
    let threads_per_worker = a.job.threads_per_worker;
    // Through the same parser as `submit --workers`, so a count over the limit reads alike.
    let range = cvdist_common::spec::parse_workers(&workers.to_string())?;
    let spec = JobSpec::try_from(a.job.with_workers(range))?;
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let threads = if threads_per_worker > 0 { threads_per_worker } else { (cores / workers).max(1) };
    let out = a.out.unwrap_or_else(|| {
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        PathBuf::from("runs").join(format!("{}-{stamp}", spec.model))
    });
    if spec.dataset.parse() == Ok(Dataset::Cifar10) && a.data.is_none() {
        anyhow::bail!("--data DIR is required for CIFAR-10 (or pass --dataset synthetic)");
    }
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<i32>();
    tokio::spawn(async move {
        let _ = signal_tx.send(shutdown_signal().await);
    });
    let interrupted = async move { signal_rx.await.unwrap_or(0) };
    let outcome = local::run_local(
        LocalRun {
            spec,
            workers,
            data: a.data,
            out,
            threads_per_worker: threads,
            device: a.device,
            worker_bin: local::worker_binary()?,
            quiet: a.quiet,
            keep_checkpoints: a.keep_checkpoints,
        },
        interrupted,
    )
    .await?;
    Ok(match outcome {
        local::Outcome::Finished(true) => 0,
        local::Outcome::Finished(false) => 1,
        // The shell's convention for "killed by signal N".
        local::Outcome::Interrupted(signal) => 128 + signal,
    })
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM with that signal's number (2 or 15).
async fn shutdown_signal() -> i32 {
    const SIGINT: i32 = 2;
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        const SIGTERM: i32 = 15;
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return SIGINT;
            }
        };
        tokio::select! {
            _ = ctrl_c => SIGINT,
            _ = term.recv() => SIGTERM,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        SIGINT
    }
}
