//! The `cvdist-worker` command line: its clap definitions and one function per command.
//! `cvdist worker|models|train|eval|export|import` hand over to this binary, so users
//! normally reach it through `cvdist`. `main.rs` only parses, sets up logging and calls
//! [`run`].

mod tools;
mod train;
mod worker;

use clap::{Args, Parser, Subcommand};
use cvdist_common::args::TrainingArgs;
use cvdist_common::choices::DeviceRequest;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cvdist-worker",
    version,
    about = "cvdist worker: trains through libtorch and all-reduces with its peers"
)]
pub struct Cli {
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
        #[arg(long, default_value_t = DeviceRequest::Auto)]
        device: DeviceRequest,
    },
}

/// `eval`: what `cvdist eval` passes on, plus where to write the result.
#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    eval: cvdist_common::args::EvalArgs,
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
    #[arg(long, env = "CVDIST_DEVICE", default_value_t = DeviceRequest::Auto)]
    device: DeviceRequest,
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
    /// Seconds a running job keeps training while this worker has no session with the
    /// coordinator (it restarts, say; the job's ring does not need it). A restarted
    /// coordinator re-adopts the job; after this long without one the job stops.
    #[arg(long, env = "CVDIST_DETACHED_TIMEOUT", default_value_t = crate::agent::DEFAULT_DETACHED_TIMEOUT.as_secs())]
    detached_timeout: u64,
}

/// `cvdist train`: the training recipe (shared with `cvdist submit` and `local`) plus
/// where this one process reads, writes and runs.
#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// CIFAR-10 directory (holding cifar-10-batches-bin/).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Resume from this checkpoint's JSON record.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run directory (metrics.jsonl, summary.json, checkpoints/).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = DeviceRequest::Auto)]
    device: DeviceRequest,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    quiet: bool,
    /// Also write per-epoch scalars as TensorBoard event files into this directory.
    #[arg(long)]
    tensorboard: Option<PathBuf>,
}

/// A run that went to its end but did not produce what a success needs (its summary.json
/// says why); the process exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunFailed(pub String);

/// Runs the parsed command. Errors are for the caller to print; a [`RunFailed`] among
/// them means the run itself failed (exit 1), anything else bad input or an error around
/// the run (exit 2).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Worker(a) => worker::run(a),
        Command::Models => tools::print_models(),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => tools::eval(a),
        Command::Export(a) => tools::export(a),
        Command::Import(a) => tools::import(a),
        Command::CheckDevice { device } => tools::check_device(device),
    }
}
