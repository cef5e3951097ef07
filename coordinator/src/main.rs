//! `cvdist`: the one entry point for users. Control-plane commands run here; commands that
//! need libtorch (`worker`, `models`, `train`, `eval`, `export`, `import`) are handed to
//! the `cvdist-worker` binary so this one stays free of libtorch.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cvdist_common::proto::{
    CancelJobRequest, GetJobRequest, JobState, ListJobsRequest, ListWorkersRequest, SubmitJobRequest,
};
use cvdist_common::term::stderr_line;
use cvdist_common::{auth, spec, text};
use cvdist_coordinator::follow::{self, Connection};
use cvdist_coordinator::local::{self, LocalRun};
use cvdist_coordinator::report;
use cvdist_coordinator::server::{self, CoordinatorConfig, TlsFiles};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cvdist", version, about = "Distributed data-parallel training of CIFAR-10 classifiers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    Eval {
        /// Checkpoint JSON record (or its .safetensors file).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        data: Option<PathBuf>,
        /// "cifar10" or "synthetic".
        #[arg(long, default_value = "cifar10")]
        dataset: String,
        #[arg(long, default_value_t = 0)]
        test_samples: u64,
        /// Directory for confusion.png and eval.json.
        #[arg(long, default_value = "eval")]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
    },
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

#[derive(Args, Clone)]
struct JobArgs {
    /// Model name (`cvdist models` lists them).
    #[arg(long)]
    model: String,
    #[arg(long)]
    epochs: u32,
    /// Batch size per worker; the global batch is this times the number of workers. N workers
    /// x batch b average their gradients over the same N·b samples one worker with batch N·b
    /// sees, but BatchNorm normalises over each worker's own b samples, so with BatchNorm (every
    /// zoo model) the two do not train identically (docs/ARCHITECTURE.md, "N workers × batch b").
    #[arg(long, default_value_t = 128)]
    batch_size: u32,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// "cifar10" or "synthetic".
    #[arg(long, default_value = "cifar10")]
    dataset: String,
    /// Train on the first N training images only (0 = all).
    #[arg(long, default_value_t = 0)]
    train_samples: u64,
    /// Evaluate on the first N test images only (0 = all).
    #[arg(long, default_value_t = 0)]
    test_samples: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Scale the learning rate linearly with the number of workers (with --warmup-epochs).
    #[arg(long)]
    scale_lr: bool,
    /// With --scale-lr: ramp the rate linearly, per step, from --lr to lr × workers over
    /// this many epochs, then cosine from there (Goyal et al. 2017; needs --scale-lr).
    #[arg(long, default_value_t = 0)]
    warmup_epochs: u32,
    /// Also checkpoint every K steps (checkpoints are always written at epoch ends).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u32,
    /// Restarts allowed after worker failures before the job fails.
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Fail the job if the group cannot be formed within this many seconds (0 = wait).
    #[arg(long, default_value_t = 0)]
    rendezvous_timeout: u32,
    /// Disable random crop and flip.
    #[arg(long)]
    no_augment: bool,
    /// Arithmetic precision: "fp32", "bf16" (autocast to bfloat16, CPU and CUDA; no loss
    /// scaling needed) or "fp16" (CUDA autocast with dynamic loss scaling). Default fp32.
    #[arg(long, value_parser = ["fp32", "bf16", "fp16"])]
    precision: Option<String>,
    /// Alias of --precision fp16, kept for existing scripts.
    #[arg(long)]
    amp: bool,
    /// channels_last (NHWC) memory layout for activations and conv weights, on CPU and
    /// CUDA; faster for most models (`--channels-last false` for NCHW).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    channels_last: bool,
    /// "auto" (NCCL when every rank is on CUDA, else ring), "ring" or "nccl".
    #[arg(long, default_value = "auto")]
    collective: String,
    /// Seconds a rank waits for one collective (or NCCL's start) before it aborts the
    /// communicator and the attempt fails (a dead or stalled peer); also the ring's timeout.
    #[arg(long, value_name = "SECONDS", default_value_t = spec::DEFAULT_COLLECTIVE_TIMEOUT_S)]
    collective_timeout: u32,
    /// Job name (letters, digits, '.', '_', '-').
    #[arg(long, default_value = "")]
    name: String,
    /// Intra-op threads per worker (0 = the worker's default).
    #[arg(long, default_value_t = 0)]
    threads_per_worker: u32,
}

impl JobArgs {
    fn spec(&self, workers: &str) -> anyhow::Result<cvdist_common::proto::JobSpec> {
        let (min, max) = spec::parse_workers(workers)?;
        let mut s = spec::default_spec(&self.model, self.epochs);
        s.name = self.name.clone();
        s.batch_size = self.batch_size;
        s.lr = self.lr;
        s.momentum = self.momentum;
        s.weight_decay = self.weight_decay;
        s.dataset = self.dataset.clone();
        s.train_samples = self.train_samples;
        s.test_samples = self.test_samples;
        s.seed = self.seed;
        s.scale_lr = self.scale_lr;
        s.warmup_epochs = self.warmup_epochs;
        s.checkpoint_every_steps = self.checkpoint_every;
        s.max_restarts = self.max_restarts;
        s.rendezvous_timeout_s = self.rendezvous_timeout;
        s.augment = !self.no_augment;
        spec::set_precision(&mut s, self.precision.as_deref(), self.amp)?;
        s.channels_last = self.channels_last;
        s.collective = self.collective.clone();
        s.collective_timeout_s = self.collective_timeout;
        s.threads_per_worker = self.threads_per_worker;
        s.min_workers = min;
        s.max_workers = max;
        spec::validate(&s)?;
        Ok(s)
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
    #[arg(long, default_value = "auto")]
    device: String,
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

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CVDIST_LOG")
        .unwrap_or_else(|_| "warn,cvdist_coordinator=info".into());
    let quiet_logs = !matches!(cli.command, Command::Coordinator(_));
    tracing_subscriber::fmt()
        .with_env_filter(if quiet_logs {
            tracing_subscriber::EnvFilter::try_from_env("CVDIST_LOG").unwrap_or_else(|_| "error".into())
        } else {
            filter
        })
        .with_writer(std::io::stderr)
        .with_ansi(cvdist_common::term::stderr_color())
        // Its default reports a failed write with eprintln!, which panics once stderr is a
        // broken pipe (see term::stderr_line).
        .log_internal_errors(false)
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            stderr_line(format_args!("error: {}", follow::explain(&e)));
            2
        }
    };
    std::process::exit(code);
}

/// Hands the whole command over to `cvdist-worker`. On Unix this process *becomes* it
/// (exec), so signals, the exit status and process supervisors (systemd, Kubernetes,
/// Slurm) all see the real worker; a parent that waited would leave the worker running
/// with parent 1 when it is killed. Returns only on failure to start it.
fn hand_over(sub: &str, args: &[String]) -> anyhow::Result<i32> {
    let bin = local::worker_binary()?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(sub).args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        Err(anyhow::Error::new(err).context(format!("running {}", bin.display())))
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status().with_context(|| format!("running {}", bin.display()))?;
        Ok(status.code().unwrap_or(1))
    }
}

/// Runs `cvdist-worker SUB` as a child and waits, for commands that post-process its
/// output (`eval`); the child is killed if this process dies first.
fn run_worker_child(sub: &str, args: &[String]) -> anyhow::Result<i32> {
    let bin = local::worker_binary()?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(sub).args(args);
    local::die_with_parent(&mut cmd);
    let status = cmd.status().with_context(|| format!("running {}", bin.display()))?;
    Ok(status.code().unwrap_or(1))
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Worker { args } => return hand_over("worker", &args),
        Command::Models { args } => return hand_over("models", &args),
        Command::Train { args } => return hand_over("train", &args),
        Command::Export { args } => return hand_over("export", &args),
        Command::Import { args } => return hand_over("import", &args),
        Command::Eval { checkpoint, data, dataset, test_samples, out, device } => {
            return run_eval(checkpoint, data, dataset, test_samples, out, device)
        }
        Command::Download { out, url, md5 } => {
            let spec = cvdist_common::download::DownloadSpec { url, md5 };
            let dir = cvdist_common::download::download_cifar10(&out, &spec, true)?;
            println!("CIFAR-10 ready in {}", dir.display());
            return Ok(0);
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async_main(cli.command))
}

async fn async_main(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Coordinator(a) => {
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
            let listener =
                tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
            server::serve(listener, cfg, async {
                let _ = shutdown_signal().await;
            })
            .await?;
            Ok(0)
        }
        Command::Submit(a) => {
            let spec = a.job.spec(&a.workers)?;
            let conn = a.conn.connection()?;
            let mut client = conn.client().await?;
            let id = client
                .submit_job(SubmitJobRequest { spec: Some(spec) })
                .await
                .map_err(|s| anyhow::anyhow!("submit refused: {}", follow::status_text(&s)))?
                .into_inner()
                .job_id;
            println!("{}", text::printable(&id));
            if a.follow {
                let info = follow::follow(&conn, &id, false).await?;
                return Ok(if follow::print_summary(&info) { 0 } else { 1 });
            }
            Ok(0)
        }
        Command::Status { job, conn } => {
            let mut client = conn.connection()?.client().await?;
            match job {
                Some(id) => {
                    let info = client
                        .get_job(GetJobRequest { job_id: id })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?;
                    print!("{}", follow::describe(info.get_ref(), follow::now_unix()));
                }
                None => {
                    match client.list_workers(ListWorkersRequest {}).await {
                        Ok(w) => print!("{}", follow::workers_table(&w.into_inner().workers, follow::now_unix())),
                        // A coordinator from before ListWorkers: show what it can tell.
                        Err(s) if s.code() == tonic::Code::Unimplemented => {
                            println!("workers: this coordinator predates the workers overview (upgrade it to see them)")
                        }
                        Err(s) => anyhow::bail!("{}", follow::status_text(&s)),
                    }
                    let jobs = client
                        .list_jobs(ListJobsRequest {})
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?;
                    let jobs = jobs.into_inner().jobs;
                    let active = jobs.iter().filter(|j| !cvdist_coordinator::state::is_terminal(j.state())).count();
                    println!("{} jobs ({} active)", jobs.len(), active);
                    for j in jobs.iter().filter(|j| !cvdist_coordinator::state::is_terminal(j.state())) {
                        println!("{}", follow::job_row(j));
                    }
                }
            }
            Ok(0)
        }
        Command::Jobs { conn } => {
            let mut client = conn.connection()?.client().await?;
            let jobs = client
                .list_jobs(ListJobsRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?;
            println!(
                "{:<24} {:<11} {:<12} {:>11} {:>3} {:>8}  MESSAGE",
                "JOB", "STATE", "MODEL", "EPOCHS", "N", "TEST ACC"
            );
            for j in &jobs.get_ref().jobs {
                println!("{}", follow::job_row(j));
            }
            Ok(0)
        }
        Command::Logs { job, follow: watch, conn } => {
            let conn = conn.connection()?;
            let mut client = conn.client().await?;
            let info = client
                .get_job(GetJobRequest { job_id: job.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", follow::status_text(&s)))?
                .into_inner();
            if watch {
                let info = follow::follow(&conn, &job, false).await?;
                return Ok(if follow::print_summary(&info) { 0 } else { 1 });
            }
            for e in &info.events {
                println!("{}", text::printable(&follow::event_line(e, None)));
            }
            Ok(0)
        }
        Command::Cancel { job, conn } => {
            let mut client = conn.connection()?.client().await?;
            let info = client
                .cancel_job(CancelJobRequest { job_id: job })
                .await
                .map_err(|s| anyhow::anyhow!("cancel refused: {}", follow::status_text(&s)))?
                .into_inner();
            println!(
                "{} {}",
                text::printable(&info.id),
                follow::state_label(JobState::try_from(info.state).unwrap_or(JobState::Unspecified))
            );
            Ok(0)
        }
        Command::Local(a) => {
            let workers = a.workers.max(1);
            let spec = a.job.spec(&workers.to_string())?;
            let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
            let threads =
                if a.job.threads_per_worker > 0 { a.job.threads_per_worker } else { (cores / workers).max(1) };
            let out = a.out.unwrap_or_else(|| {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                PathBuf::from("runs").join(format!("{}-{stamp}", spec.model))
            });
            if spec.dataset == "cifar10" && a.data.is_none() {
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
                local::Outcome::Finished(ok) => {
                    if ok {
                        0
                    } else {
                        1
                    }
                }
                // The shell's convention for "killed by signal N".
                local::Outcome::Interrupted(signal) => 128 + signal,
            })
        }
        Command::Report { runs, out, conn } => {
            let mut loaded = Vec::new();
            for r in &runs {
                let path = PathBuf::from(r);
                if path.is_dir() {
                    loaded.push(report::load_run(&path)?);
                } else {
                    let mut client = conn.connection()?.client().await?;
                    let info = client
                        .get_job(GetJobRequest { job_id: r.clone() })
                        .await
                        .map_err(|s| {
                            anyhow::anyhow!("{r} is neither a run directory nor a job: {}", follow::status_text(&s))
                        })?
                        .into_inner();
                    loaded.push(report::Run {
                        label: text::printable(
                            &info
                                .spec
                                .as_ref()
                                .map(|s| s.name.clone())
                                .filter(|n| !n.is_empty())
                                .unwrap_or_else(|| info.id.clone()),
                        )
                        .into_owned(),
                        dir: PathBuf::from(&info.id),
                        metrics: info.history.clone(),
                        summary: None,
                        job: info.spec.clone(),
                    });
                }
            }
            let rendered = report::write_charts(&loaded, &out)?;
            for w in &rendered.warnings {
                stderr_line(format_args!("warning: {w}"));
            }
            print!("{}", report::summary_table(&loaded));
            for f in &rendered.files {
                println!("wrote {}", f.display());
            }
            Ok(0)
        }
        Command::Worker { .. }
        | Command::Models { .. }
        | Command::Train { .. }
        | Command::Download { .. }
        | Command::Eval { .. }
        | Command::Export { .. }
        | Command::Import { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// Evaluation runs in the worker binary (libtorch); the chart is drawn here.
fn run_eval(
    checkpoint: PathBuf,
    data: Option<PathBuf>,
    dataset: String,
    test_samples: u64,
    out: PathBuf,
    device: String,
) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("eval.json");
    let mut args = vec![
        "--checkpoint".to_string(),
        checkpoint.display().to_string(),
        "--dataset".into(),
        dataset,
        "--test-samples".into(),
        test_samples.to_string(),
        "--json-out".into(),
        json_path.display().to_string(),
        "--device".into(),
        device,
    ];
    if let Some(d) = data {
        args.push("--data".into());
        args.push(d.display().to_string());
    }
    let code = run_worker_child("eval", &args)?;
    if code != 0 {
        return Ok(code);
    }
    let text = std::fs::read_to_string(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
    let result: EvalResult = serde_json::from_str(&text).with_context(|| format!("parsing {}", json_path.display()))?;
    let names: Vec<&str> = result.classes.iter().map(String::as_str).collect();
    let png = out.join("confusion.png");
    let rendered = report::write_confusion_matrix(&result.confusion, &names, &png)?;
    for w in &rendered.warnings {
        stderr_line(format_args!("warning: {w}"));
    }
    println!("{}: test accuracy {:.2}% on {} images", result.model, result.accuracy * 100.0, result.samples);
    for (name, acc) in result.classes.iter().zip(&result.per_class) {
        println!("  {name:<12} {:6.2}%", acc * 100.0);
    }
    println!("wrote {} and {}", json_path.display(), png.display());
    Ok(0)
}

/// What `cvdist-worker eval --json-out` writes.
#[derive(serde::Deserialize)]
struct EvalResult {
    model: String,
    samples: u64,
    accuracy: f64,
    per_class: Vec<f64>,
    confusion: Vec<Vec<u64>>,
    classes: Vec<String>,
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
