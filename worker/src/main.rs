//! `cvdist-worker`: the libtorch side of cvdist. `cvdist worker|models|train` hand over to
//! this binary, so users normally call it through `cvdist`.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cvdist_common::proto::{EpochMetrics, JobSpec, Progress};
use cvdist_common::term::stderr_line;
use cvdist_common::{auth, run_dir, spec};
use cvdist_worker::agent::{self, WorkerConfig};
use cvdist_worker::collective::Solo;
use cvdist_worker::models;
use cvdist_worker::train::checkpoint::{self, CheckpointState};
use cvdist_worker::train::tensorboard;
use cvdist_worker::train::{self, Datasets, Observer, TrainerConfig};
use cvdist_worker::{eval, interop};
use indicatif::{ProgressBar, ProgressStyle};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::Device;

#[derive(Parser)]
#[command(
    name = "cvdist-worker",
    version,
    about = "cvdist worker: trains through libtorch and all-reduces with its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a coordinator and train whatever it assigns.
    #[command(
        after_help = "Examples:\n  cvdist worker --coordinator http://127.0.0.1:50051 --data data/cifar10\n  cvdist worker --coordinator http://coord:50051 --device cuda:0 --data-listen 0.0.0.0:29500 --advertise-addr $(hostname -f):29500\n  cvdist worker --coordinator http://coord:50051 --gpus all --data-listen 0.0.0.0:29500 --advertise-addr $(hostname -f):29500"
    )]
    Worker(WorkerArgs),
    /// Print the model zoo: parameters and multiply-adds per 32x32 image.
    #[command(after_help = "Example:\n  cvdist models")]
    Models,
    /// Train in this process, without a coordinator (the bare trainer).
    #[command(
        after_help = "Examples:\n  cvdist train --model resnet20 --epochs 5 --data data/cifar10 --out runs/r20\n  cvdist train --model resnet18 --epochs 1 --dataset synthetic --out runs/smoke"
    )]
    Train(TrainArgs),
    /// Test accuracy, per-class accuracy and confusion matrix of a checkpoint.
    #[command(
        after_help = "Examples:\n  cvdist-worker eval --checkpoint runs/r20/checkpoints/ckpt-e0005-s000000.json --data data/cifar10\n  cvdist-worker eval --checkpoint runs/smoke/checkpoints/ckpt-e0001-s000000.json --dataset synthetic --json-out eval.json"
    )]
    Eval(EvalArgs),
    /// Write a checkpoint's weights as a PyTorch state_dict (safetensors, strict-loadable).
    #[command(
        after_help = "Example:\n  cvdist-worker export --checkpoint runs/r20/checkpoints/ckpt-e0005-s000000.json --out resnet20.safetensors\n\nIn PyTorch: model.load_state_dict(safetensors.torch.load_file(\"resnet20.safetensors\"), strict=True)"
    )]
    Export(ExportArgs),
    /// Turn a PyTorch state_dict (safetensors) into a checkpoint that `train --resume` warm-starts from.
    #[command(
        after_help = "Example:\n  cvdist-worker import --model resnet20 --weights resnet20.safetensors --out warm/\n  cvdist-worker train --model resnet20 --epochs 5 --data data/cifar10 --out runs/ft --resume warm/ckpt-e0000-s000000.json"
    )]
    Import(ImportArgs),
    /// Print what `--device` resolves to here, or refuse it (exit 2) as `worker` would;
    /// `cvdist local` asks this before starting its workers.
    #[command(hide = true)]
    CheckDevice {
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

#[derive(Args)]
struct EvalArgs {
    /// Checkpoint JSON record (or its .safetensors file).
    #[arg(long)]
    checkpoint: PathBuf,
    /// CIFAR-10 directory (for --dataset cifar10).
    #[arg(long)]
    data: Option<PathBuf>,
    /// "cifar10" or "synthetic".
    #[arg(long, default_value = "cifar10")]
    dataset: String,
    /// Evaluate on the first N test images only (0 = all).
    #[arg(long, default_value_t = 0)]
    test_samples: u64,
    /// "auto", "cpu", "cuda" (the local rank's GPU) or "cuda:K".
    #[arg(long, default_value = "auto")]
    device: String,
    /// Also write the result as JSON (model, accuracy, per_class, confusion, classes).
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint JSON record (or its .safetensors file).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// Value of every BatchNorm's num_batches_tracked (default: the steps taken, when the
    /// run's job.json is next to checkpoints/, else 0).
    #[arg(long)]
    num_batches_tracked: Option<i64>,
}

#[derive(Args)]
struct ImportArgs {
    /// Model name (`cvdist models` lists them); the weights must match it exactly.
    #[arg(long)]
    model: String,
    /// A state_dict saved with safetensors.torch.save_file.
    #[arg(long)]
    weights: PathBuf,
    /// Directory for the checkpoint ckpt-e0000-s000000.{safetensors,json}.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct WorkerArgs {
    /// Coordinator URL (http:// or https://).
    #[arg(long, env = "CVDIST_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// "auto" (the local rank's GPU if CUDA is available, else CPU), "cpu", "cuda" (the
    /// local rank's GPU: cuda:(rank mod count), the rank from LOCAL_RANK or SLURM_LOCALID,
    /// else 0) or "cuda:K".
    #[arg(long, env = "CVDIST_DEVICE", default_value = "auto")]
    device: String,
    /// Start and supervise one worker per GPU ("all" or a count): worker K gets cuda:K,
    /// data-plane port PORT+K, id ID-gK and LOCAL_RANK=K; a dead worker is restarted and
    /// SIGTERM stops all. With --device cpu, N CPU workers (for tests).
    #[arg(long, env = "CVDIST_GPUS")]
    gpus: Option<String>,
    /// Local CIFAR-10 copy; without it the dataset is fetched from the coordinator.
    #[arg(long, env = "CVDIST_DATA")]
    data: Option<PathBuf>,
    /// Where fetched data and local checkpoints are kept. Checkpoints go into this worker's
    /// own CACHE_DIR/workers/<worker id>/, so several workers may share one cache dir.
    #[arg(long, env = "CVDIST_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Data-plane listener for gradient exchange with peers.
    #[arg(long, env = "CVDIST_DATA_LISTEN", default_value = "127.0.0.1:0")]
    data_listen: SocketAddr,
    /// Address peers dial (required when --data-listen is a wildcard address).
    #[arg(long, env = "CVDIST_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Stable worker identity (e.g. the pod name); random when absent.
    #[arg(long, env = "CVDIST_WORKER_ID", default_value = "")]
    worker_id: String,
    /// Intra-op threads (0 = all cores).
    #[arg(long, env = "CVDIST_THREADS", default_value_t = 0)]
    threads: usize,
    /// File holding the worker credential (else $CVDIST_WORKER_TOKEN): the secret that
    /// admits workers, distinct from the client token users hold.
    #[arg(long, env = "CVDIST_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// Older setups: a token file used only when no worker credential is given (else
    /// $CVDIST_TOKEN). Coordinators refuse the client token for workers with PERMISSION_DENIED.
    #[arg(long, env = "CVDIST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate for an https:// coordinator.
    #[arg(long, env = "CVDIST_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    epochs: u32,
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
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    train_samples: u64,
    #[arg(long, default_value_t = 0)]
    test_samples: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    no_augment: bool,
    /// Arithmetic precision: "fp32", "bf16" (autocast to bfloat16, CPU and CUDA; no loss
    /// scaling needed) or "fp16" (CUDA autocast with dynamic loss scaling). Default fp32.
    #[arg(long, value_parser = ["fp32", "bf16", "fp16"])]
    precision: Option<String>,
    /// Alias of --precision fp16, kept for existing scripts.
    #[arg(long)]
    amp: bool,
    /// channels_last (NHWC) memory layout; `--channels-last false` for NCHW.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    channels_last: bool,
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u32,
    /// Seconds to wait for one collective before aborting the communicator (kept in the
    /// run's job.json; a single process only waits on itself).
    #[arg(long, value_name = "SECONDS", default_value_t = spec::DEFAULT_COLLECTIVE_TIMEOUT_S)]
    collective_timeout: u32,
    /// Resume from this checkpoint's JSON record.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run directory (metrics.jsonl, summary.json, checkpoints/).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    quiet: bool,
    /// Also write per-epoch scalars as TensorBoard event files into this directory.
    #[arg(long)]
    tensorboard: Option<PathBuf>,
}

fn parse_device(text: &str) -> anyhow::Result<Device> {
    Ok(cvdist_worker::device::from_cli(text)?)
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".into(),
    }
}

fn main() {
    cvdist_worker::allocator::keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CVDIST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(cvdist_common::term::stderr_color())
        // Its default reports a failed write with eprintln!, which panics once stderr is a
        // broken pipe (see term::stderr_line).
        .log_internal_errors(false)
        .init();
    let result = match cli.command {
        Command::Worker(a) => run_worker(a),
        Command::Models => print_models(),
        Command::Train(a) => run_train(a),
        Command::Eval(a) => run_eval(a),
        Command::Export(a) => run_export(a),
        Command::Import(a) => run_import(a),
        Command::CheckDevice { device } => parse_device(&device).map(|d| println!("{}", device_name(d))),
    };
    if let Err(e) = result {
        let causes: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        stderr_line(format_args!("error: {}", causes.join(": ")));
        // 1: the run itself failed (as `cvdist local` for a failed job); 2: bad input or
        // an error before or around the run.
        std::process::exit(if e.downcast_ref::<RunFailed>().is_some() { 1 } else { 2 });
    }
}

/// A run that went to its end but did not produce what a success needs (its summary.json
/// says why); the process exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RunFailed(String);

fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("cvdist")
}

fn run_worker(a: WorkerArgs) -> anyhow::Result<()> {
    if let Some(gpus) = &a.gpus {
        return run_supervisor(&a, gpus);
    }
    let device = parse_device(&a.device)?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    let token = match auth::load_worker_token(a.worker_token_file.as_deref())? {
        Some(t) => Some(t),
        None => {
            let t = auth::load_token(a.token_file.as_deref())?;
            if t.is_some() {
                tracing::warn!(
                    "no worker credential (CVDIST_WORKER_TOKEN or --worker-token-file); trying the client token, which a coordinator with a worker credential refuses"
                );
            }
            t
        }
    };
    let cfg = WorkerConfig {
        coordinator: a.coordinator,
        token,
        tls_ca: a.tls_ca,
        worker_id: a.worker_id,
        device,
        threads: tch::get_num_threads() as usize,
        data: a.data,
        cache_dir: a.cache_dir.unwrap_or_else(default_cache),
        data_listen: a.data_listen,
        advertise_addr: a.advertise_addr,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(agent::run(cfg, stop_signal()))?;
    Ok(())
}

/// `worker --gpus`: one child `cvdist-worker worker` per GPU (see `supervisor.rs`).
fn run_supervisor(a: &WorkerArgs, gpus: &str) -> anyhow::Result<()> {
    use cvdist_worker::supervisor;
    let count = supervisor::parse_gpus(gpus)?;
    // Only count GPUs when they matter: CPU stand-ins need no CUDA driver.
    let cuda = if cvdist_worker::device::parse(&a.device) == Ok(cvdist_worker::device::DeviceRequest::Cpu) {
        0
    } else {
        cvdist_worker::device::visible_cuda_devices()
    };
    let worker_id = if a.worker_id.is_empty() {
        format!("worker-{:06x}", rand::random::<u32>() & 0xff_ffff)
    } else {
        a.worker_id.clone()
    };
    let req = supervisor::Request {
        gpus: count,
        device: a.device.clone(),
        data_listen: a.data_listen,
        advertise_addr: a.advertise_addr.clone(),
        worker_id,
        threads: a.threads,
        cache_dir: a.cache_dir.clone().unwrap_or_else(default_cache),
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let plans = supervisor::plan(&req, cuda, cores)?;
    let program = std::env::current_exe().context("locating the cvdist-worker executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    supervisor::run(&program, &args, plans, supervisor::DEFAULT_GRACE)
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C), after which the agent stops its job
/// and leaves; a second one ends the process at once.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            // Without handlers the default action (terminate) still applies.
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping the job and leaving the coordinator");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stderr_line(format_args!("second signal: exiting at once"));
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn print_models() -> anyhow::Result<()> {
    println!("{:<12} {:>12} {:>16}", "MODEL", "PARAMS", "MACS/IMAGE");
    for m in models::all() {
        println!("{:<12} {:>12} {:>16}", m.name, group(m.params), group(m.macs));
    }
    Ok(())
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Progress bar and run-directory writer for the bare trainer.
struct LocalObserver {
    bar: ProgressBar,
    out: PathBuf,
    history: Vec<EpochMetrics>,
    epochs: u32,
    tensorboard: Option<tensorboard::EventWriter>,
}

impl Observer for LocalObserver {
    fn progress(&mut self, p: &Progress) {
        self.bar.set_length(p.steps_per_epoch);
        self.bar.set_position(p.step);
        self.bar.set_message(format!(
            "epoch {}/{} loss {:.4} acc {:.2}% {:.0} img/s",
            p.epoch + 1,
            self.epochs,
            p.loss,
            p.acc * 100.0,
            p.images_per_sec
        ));
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        self.bar.println(format!(
            "epoch {:>3}/{}  train loss {:.4} acc {:6.2}%  test loss {:.4} acc {:6.2}%  lr {:.5}  {:.1}s  {:.0} img/s",
            m.epoch + 1,
            self.epochs,
            m.train_loss,
            m.train_acc * 100.0,
            m.test_loss,
            m.test_acc * 100.0,
            m.lr,
            m.seconds,
            m.images_per_sec
        ));
        self.history.retain(|h| h.epoch < m.epoch);
        self.history.push(m.clone());
        if let Err(e) = run_dir::write_metrics(&self.out, &self.history) {
            self.bar.println(format!("warning: {e}"));
        }
        if let Some(tb) = &mut self.tensorboard {
            if let Err(e) = tb.epoch(m) {
                self.bar.println(format!("warning: TensorBoard {}: {e}", tb.path().display()));
            }
        }
    }

    fn checkpoint(&mut self, json: &Path, _state: &CheckpointState) {
        tracing::debug!(checkpoint = %json.display(), "checkpoint written");
    }
}

fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    let mut s: JobSpec = spec::default_spec(&a.model, a.epochs);
    s.batch_size = a.batch_size;
    s.lr = a.lr;
    s.momentum = a.momentum;
    s.weight_decay = a.weight_decay;
    s.dataset = a.dataset;
    s.train_samples = a.train_samples;
    s.test_samples = a.test_samples;
    s.seed = a.seed;
    s.augment = !a.no_augment;
    spec::set_precision(&mut s, a.precision.as_deref(), a.amp)?;
    s.channels_last = a.channels_last;
    s.checkpoint_every_steps = a.checkpoint_every;
    s.collective_timeout_s = a.collective_timeout;
    spec::validate(&s)?;
    let data = Datasets::for_spec(&s, a.data.as_deref())?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    run_dir::write_job(&a.out, &s)?;
    // Resuming into the same directory keeps the epochs already recorded.
    let history = if a.resume.is_some() { run_dir::read_metrics(&a.out).unwrap_or_default() } else { Vec::new() };
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("[{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let tensorboard = match &a.tensorboard {
        Some(dir) => Some(
            tensorboard::EventWriter::create(dir)
                .with_context(|| format!("creating TensorBoard events in {}", dir.display()))?,
        ),
        None => None,
    };
    let mut observer = LocalObserver { bar, out: a.out.clone(), history, epochs: s.epochs, tensorboard };
    let cfg = TrainerConfig {
        spec: s.clone(),
        device,
        rank: 0,
        world_size: 1,
        checkpoint_dir: Some(a.out.join(run_dir::CHECKPOINT_DIR)),
        resume: a.resume,
        progress_interval: Duration::from_millis(500),
        freeze_bn: false,
    };
    let started = std::time::Instant::now();
    let result = train::train(&cfg, &data, &mut Solo::new(), &mut observer);
    observer.bar.finish_and_clear();
    let mut summary = run_dir::Summary::from_history(&observer.history);
    summary.model = s.model.clone();
    // A failed run (a diverged one above all) says so in its summary, so that nothing that
    // reads the run directory mistakes it for a result; the error also ends the process
    // with a non-zero status.
    match &result {
        Ok(outcome) => {
            summary.wall_seconds = outcome.wall_seconds;
            let final_name = checkpoint::name_for(s.epochs, 0);
            let final_json = cfg.checkpoint_dir.as_ref().map(|d| d.join(format!("{final_name}.json")));
            // Trained to the end is not enough: without its final checkpoint the run has no model.
            let missing = match (&outcome.final_checkpoint_error, &final_json) {
                (Some(e), _) => Some(e.clone()),
                (None, Some(p)) if !p.is_file() => Some(format!("{} does not exist", p.display())),
                _ => None,
            };
            if let Some(why) = missing {
                summary.state = "failed".into();
                summary.outcome = run_dir::outcome::FINAL_CHECKPOINT_MISSING.into();
                summary.message =
                    format!("training finished but the final checkpoint {final_name} was not written: {why}");
                run_dir::write_summary(&a.out, &summary)?;
                return Err(RunFailed(format!("{}; run directory {}", summary.message, a.out.display())).into());
            }
            summary.state = "succeeded".into();
            summary.outcome = "succeeded".into();
        }
        Err(e) => {
            summary.state = "failed".into();
            summary.outcome = run_dir::outcome::of_failure(e.failure_kind()).into();
            summary.message = e.to_string();
            summary.wall_seconds = started.elapsed().as_secs_f64();
        }
    }
    run_dir::write_summary(&a.out, &summary)?;
    result?;
    println!(
        "{}: final test accuracy {:.2}%, best {:.2}%, {:.1}s per epoch, run directory {}",
        s.model,
        summary.final_test_acc * 100.0,
        summary.best_test_acc * 100.0,
        summary.mean_epoch_seconds,
        a.out.display()
    );
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let r = eval::evaluate_checkpoint(&a.checkpoint, &a.dataset, a.data.as_deref(), a.test_samples, device)?;
    println!("{} ({}): test accuracy {:.2}% on {} images", r.model, r.checkpoint, r.accuracy * 100.0, r.samples);
    for (name, acc) in r.classes.iter().zip(&r.per_class) {
        println!("  {name:<12} {:6.2}%", acc * 100.0);
    }
    if let Some(path) = &a.json_out {
        let text = serde_json::to_vec_pretty(&r).expect("report serialises");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        run_dir::write_atomic(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    let s = interop::export_checkpoint(&a.checkpoint, &a.out, a.num_batches_tracked)?;
    println!(
        "{}: wrote {} tensors ({} parameters, num_batches_tracked {}) to {}",
        s.model,
        s.tensors,
        group(s.parameters),
        s.num_batches_tracked,
        s.out.display()
    );
    Ok(())
}

fn run_import(a: ImportArgs) -> anyhow::Result<()> {
    let s = interop::import_weights(&a.model, &a.weights, &a.out)?;
    println!(
        "{}: imported {} tensors ({} num_batches_tracked ignored) into {}; warm-start with train --resume {}",
        s.model,
        s.tensors,
        s.ignored_counters,
        s.checkpoint.display(),
        s.checkpoint.display()
    );
    Ok(())
}
