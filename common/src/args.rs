//! Command-line arguments both binaries share: the training recipe (`cvdist train`,
//! `submit`, `local`) and the job arguments around it, turned into a validated
//! [`JobSpec`] in one place, and how a bad value is reported.

use crate::choices::{Collective, Dataset, DeviceRequest, DeviceSyntaxError, GradCompression, Precision};
use crate::proto::JobSpec;
use crate::spec::{self, SpecError};
use clap::Args;
use std::path::PathBuf;

/// The training recipe: what `cvdist train` (one process, no coordinator) and a
/// coordinator job both take.
#[derive(Args, Clone, Debug)]
pub struct TrainingArgs {
    /// Model name (`cvdist models` lists them).
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub epochs: u32,
    /// Batch size per worker; the global batch is this times the number of workers. N workers
    /// x batch b average their gradients over the same N·b samples one worker with batch N·b
    /// sees, but BatchNorm normalises over each worker's own b samples, so with BatchNorm (every
    /// zoo model) the two do not train identically (docs/ARCHITECTURE.md, "N workers × batch b").
    #[arg(long, default_value_t = 128)]
    pub batch_size: u32,
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// "cifar10" or "synthetic".
    #[arg(long, default_value_t = Dataset::Cifar10)]
    pub dataset: Dataset,
    /// Train on the first N training images only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub train_samples: u64,
    /// Evaluate on the first N test images only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub test_samples: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Disable random crop and flip.
    #[arg(long)]
    pub no_augment: bool,
    /// Arithmetic precision: "fp32", "bf16" (autocast to bfloat16, CPU and CUDA; no loss
    /// scaling needed) or "fp16" (CUDA autocast with dynamic loss scaling). Default fp32.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Alias of --precision fp16, kept for existing scripts.
    #[arg(long)]
    pub amp: bool,
    /// channels_last (NHWC) memory layout for activations and conv weights, on CPU and
    /// CUDA; faster for most models (`--channels-last false` for NCHW).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub channels_last: bool,
    /// Also checkpoint every K steps (checkpoints are always written at epoch ends).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u32,
    /// Seconds a rank waits for one collective (or NCCL's start) before it aborts the
    /// communicator and the attempt fails (a dead or stalled peer); also the ring's timeout.
    #[arg(long, value_name = "SECONDS", default_value_t = spec::DEFAULT_COLLECTIVE_TIMEOUT_S)]
    pub collective_timeout: u32,
}

/// A job for the coordinator: the recipe plus what only a cluster job has (elastic
/// workers, restarts, the collective). The worker count is not a flag here, because
/// `submit` takes `N` or `MIN:MAX` while `local` takes a count of processes to start;
/// each sets it with [`JobArgs::with_workers`] before the conversion.
#[derive(Args, Clone, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Scale the learning rate linearly with the number of workers (with --warmup-epochs).
    #[arg(long)]
    pub scale_lr: bool,
    /// With --scale-lr: ramp the rate linearly, per step, from --lr to lr × workers over
    /// this many epochs, then cosine from there (Goyal et al. 2017; needs --scale-lr).
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: u32,
    /// Restarts allowed after worker failures before the job fails.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Fail the job if the group cannot be formed within this many seconds (0 = wait).
    #[arg(long, default_value_t = 0)]
    pub rendezvous_timeout: u32,
    /// How ranks sum gradients: "auto" (NCCL when every rank is on CUDA, else the ring),
    /// "ring" (cvdist's TCP ring), "gloo" (PyTorch's c10d ProcessGroupGloo, CPU; the code
    /// path NCCL runs) or "nccl" (c10d's ProcessGroupNCCL).
    #[arg(long, default_value_t = Collective::Auto)]
    pub collective: Collective,
    /// How gradients travel between workers, on the ring and NCCL alike: "none" (f32,
    /// exact), "bf16" or "fp16" (half the bytes; each hop's partial sum is rounded
    /// to 16 bits and added in f32; fp16 sums beyond ±65504 become inf). Other
    /// collectives (weights, BatchNorm statistics, metrics) stay f32.
    #[arg(long, default_value_t = GradCompression::None)]
    pub grad_compression: GradCompression,
    /// MB of f32 gradients per all-reduce bucket (PyTorch DDP's bucket_cap_mb; the first
    /// bucket in backward order is 1 MB or less). 0 picks by device: 25 on CUDA (NCCL,
    /// DDP's default), 4 on CPUs (smaller buckets hide more of a slow link behind
    /// backward); else 1 to 1024.
    #[arg(long, value_name = "MB", default_value_t = 0)]
    pub bucket_cap_mb: u32,
    /// Samples per step over all workers, whatever their number: each of N workers takes
    /// B/N (N must divide B), so the global batch, learning rate and schedule stay the same
    /// when an elastic job grows or shrinks. Replaces --batch-size; with --sync-bn the
    /// step is one worker's step on B samples, at any worker count.
    #[arg(long, value_name = "B", default_value_t = 0, conflicts_with = "scale_lr")]
    pub global_batch: u32,
    /// Normalise BatchNorm over the whole global batch (torch.nn.SyncBatchNorm): the same
    /// batch statistics, gradients and running statistics as one worker with the global
    /// batch; two small all-reduces per BatchNorm layer per step. Evaluation unchanged.
    #[arg(long)]
    pub sync_bn: bool,
    /// Job name (letters, digits, '.', '_', '-').
    #[arg(long, default_value = "")]
    pub name: String,
    /// Intra-op threads per worker (0 = the worker's default).
    #[arg(long, default_value_t = 0)]
    pub threads_per_worker: u32,
    /// Fewest and most workers, set by the command from its own `--workers`.
    #[arg(skip = (1, 1))]
    pub workers: (u32, u32),
}

impl JobArgs {
    /// The same arguments for `min..=max` workers.
    pub fn with_workers(mut self, (min, max): (u32, u32)) -> JobArgs {
        self.workers = (min, max);
        self
    }
}

impl TrainingArgs {
    /// The spec these arguments describe, not yet validated.
    fn spec(&self) -> Result<JobSpec, SpecError> {
        let mut s = spec::default_spec(&self.model, self.epochs);
        s.batch_size = self.batch_size;
        s.lr = self.lr;
        s.momentum = self.momentum;
        s.weight_decay = self.weight_decay;
        s.dataset = self.dataset.to_string();
        s.train_samples = self.train_samples;
        s.test_samples = self.test_samples;
        s.seed = self.seed;
        s.augment = !self.no_augment;
        spec::set_precision(&mut s, self.precision, self.amp)?;
        s.channels_last = self.channels_last;
        s.checkpoint_every_steps = self.checkpoint_every;
        s.collective_timeout_s = self.collective_timeout;
        Ok(s)
    }
}

/// A one-worker job (`cvdist train`), validated.
impl TryFrom<&TrainingArgs> for JobSpec {
    type Error = SpecError;
    fn try_from(a: &TrainingArgs) -> Result<JobSpec, SpecError> {
        let s = a.spec()?;
        spec::validate(&s)?;
        Ok(s)
    }
}

/// A coordinator job, validated (errors are [`SpecError`]'s one-line messages).
impl TryFrom<&JobArgs> for JobSpec {
    type Error = SpecError;
    fn try_from(a: &JobArgs) -> Result<JobSpec, SpecError> {
        let mut s = a.training.spec()?;
        s.name = a.name.clone();
        s.scale_lr = a.scale_lr;
        s.warmup_epochs = a.warmup_epochs;
        s.max_restarts = a.max_restarts;
        s.rendezvous_timeout_s = a.rendezvous_timeout;
        s.collective = a.collective.to_string();
        s.grad_compression = a.grad_compression.to_string();
        s.bucket_cap_mb = a.bucket_cap_mb;
        s.global_batch = a.global_batch;
        s.sync_bn = a.sync_bn;
        s.threads_per_worker = a.threads_per_worker;
        (s.min_workers, s.max_workers) = a.workers;
        spec::validate(&s)?;
        Ok(s)
    }
}

impl TryFrom<JobArgs> for JobSpec {
    type Error = SpecError;
    fn try_from(a: JobArgs) -> Result<JobSpec, SpecError> {
        JobSpec::try_from(&a)
    }
}

/// What to evaluate on which images: `cvdist eval` (which charts the result) and
/// `cvdist-worker eval` (which computes it) take the same flags.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    /// Checkpoint JSON record (or its .safetensors file).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// CIFAR-10 directory (for --dataset cifar10).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// "cifar10" or "synthetic".
    #[arg(long, default_value_t = Dataset::Cifar10)]
    pub dataset: Dataset,
    /// Evaluate on the first N test images only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub test_samples: u64,
    /// "auto", "cpu", "cuda" (the local rank's GPU) or "cuda:K".
    #[arg(long, default_value_t = DeviceRequest::Auto)]
    pub device: DeviceRequest,
}

impl EvalArgs {
    /// These arguments as command-line flags that parse back to them (how `cvdist eval`
    /// hands them to `cvdist-worker eval`).
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--checkpoint".to_string(),
            self.checkpoint.display().to_string(),
            "--dataset".into(),
            self.dataset.to_string(),
            "--test-samples".into(),
            self.test_samples.to_string(),
            "--device".into(),
            self.device.to_string(),
        ];
        if let Some(d) = &self.data {
            flags.push("--data".into());
            flags.push(d.display().to_string());
        }
        flags
    }
}

/// Parses the command line like `C::parse()`, except that a value one of cvdist's own
/// parsers refused (an unknown `--dataset`, `--collective`, `--grad-compression` or `--device`) is reported as
/// that parser's one line, `error: …`, and exit status 2, as when these were checked
/// after parsing, instead of clap's usage block. Everything else (help, version, unknown
/// flags, numbers that do not parse) is clap's own output.
pub fn parse<C: clap::Parser>() -> C {
    match C::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if let Some(line) = own_message(&e) {
                crate::term::stderr_line(format_args!("error: {line}"));
                std::process::exit(2);
            }
            e.exit()
        }
    }
}

/// The message of one of our value parsers inside a clap error, if it is one.
fn own_message(e: &clap::Error) -> Option<String> {
    if e.kind() != clap::error::ErrorKind::ValueValidation {
        return None;
    }
    let source = std::error::Error::source(e)?;
    if let Some(s) = source.downcast_ref::<SpecError>() {
        return Some(s.to_string());
    }
    if let Some(c) = source.downcast_ref::<crate::choices::ChoiceError>() {
        return Some(c.to_string());
    }
    source.downcast_ref::<DeviceSyntaxError>().map(|d| d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Job {
        #[command(flatten)]
        job: JobArgs,
        #[arg(long, default_value = "auto")]
        device: crate::choices::DeviceRequest,
    }

    fn parse_job(args: &[&str]) -> Result<Job, clap::Error> {
        Job::try_parse_from(std::iter::once("cvdist").chain(args.iter().copied()))
    }

    /// The defaults are the recipe `default_spec` describes, and every flag lands in its field.
    #[test]
    fn flags_become_the_spec() {
        let j = parse_job(&["--model", "resnet20", "--epochs", "2"]).unwrap();
        assert_eq!(JobSpec::try_from(&j.job), Ok(spec::default_spec("resnet20", 2)));
        let j = parse_job(&[
            "--model",
            "resnet18",
            "--epochs",
            "9",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--momentum",
            "0.8",
            "--weight-decay",
            "0.001",
            "--dataset",
            "synthetic",
            "--train-samples",
            "1000",
            "--test-samples",
            "100",
            "--seed",
            "7",
            "--scale-lr",
            "--warmup-epochs",
            "2",
            "--checkpoint-every",
            "5",
            "--max-restarts",
            "1",
            "--rendezvous-timeout",
            "30",
            "--no-augment",
            "--precision",
            "bf16",
            "--channels-last",
            "false",
            "--collective",
            "ring",
            "--collective-timeout",
            "90",
            "--grad-compression",
            "bf16",
            "--name",
            "n1",
            "--threads-per-worker",
            "2",
        ])
        .unwrap();
        let s = JobSpec::try_from(j.job.with_workers((2, 3))).unwrap();
        let want = JobSpec {
            name: "n1".into(),
            model: "resnet18".into(),
            epochs: 9,
            batch_size: 64,
            lr: 0.05,
            momentum: 0.8,
            weight_decay: 0.001,
            min_workers: 2,
            max_workers: 3,
            dataset: "synthetic".into(),
            train_samples: 1000,
            test_samples: 100,
            seed: 7,
            scale_lr: true,
            warmup_epochs: 2,
            checkpoint_every_steps: 5,
            max_restarts: 1,
            threads_per_worker: 2,
            augment: false,
            amp: false,
            precision: "bf16".into(),
            channels_last: false,
            rendezvous_timeout_s: 30,
            collective: "ring".into(),
            collective_timeout_s: 90,
            grad_compression: "bf16".into(),
            bucket_cap_mb: 0,
            sync_bn: false,
            global_batch: 0,
        };
        assert_eq!(s, want);
    }

    /// The worker range takes part in validation (the shard check), so the message names
    /// the real world size.
    #[test]
    fn validation_sees_the_workers() {
        let j = parse_job(&["--model", "resnet20", "--epochs", "1", "--train-samples", "100"]).unwrap();
        assert_eq!(
            JobSpec::try_from(j.job.with_workers((4, 4))).unwrap_err().to_string(),
            "batch size 128 is larger than each worker's shard of 25 samples (100 samples over 4 workers)"
        );
    }

    #[derive(Parser)]
    struct Eval {
        #[command(flatten)]
        eval: EvalArgs,
    }

    /// `cvdist eval` hands its arguments over as flags; they parse back to the same.
    #[test]
    fn eval_flags_round_trip() {
        let parse = |flags: Vec<String>| Eval::try_parse_from(std::iter::once("eval".to_string()).chain(flags));
        let e = parse(vec!["--checkpoint".into(), "c.json".into()]).unwrap().eval;
        assert_eq!(
            (e.dataset, e.device, e.test_samples, e.data.clone()),
            (Dataset::Cifar10, DeviceRequest::Auto, 0, None)
        );
        let back = parse(e.to_flags()).unwrap().eval;
        assert_eq!((back.checkpoint, back.dataset, back.device), (e.checkpoint, e.dataset, e.device));
        let args = [
            "--checkpoint",
            "d/c.json",
            "--data",
            "data",
            "--dataset",
            "synthetic",
            "--test-samples",
            "9",
            "--device",
            "cuda:1",
        ];
        let e = parse(args.iter().map(|s| s.to_string()).collect()).unwrap().eval;
        let back = parse(e.to_flags()).unwrap().eval;
        assert_eq!(
            (back.checkpoint, back.data, back.dataset, back.test_samples, back.device),
            ("d/c.json".into(), Some("data".into()), Dataset::Synthetic, 9, DeviceRequest::Cuda(Some(1)))
        );
    }

    /// Bad values of our own parsers keep their one-line messages; --precision keeps
    /// clap's list of possible values.
    #[test]
    fn bad_values_are_reported_in_one_line() {
        let err = |args: &[&str]| parse_job(args).err().expect("refused");
        let base = ["--model", "resnet20", "--epochs", "1"];
        let with = |extra: &[&'static str]| -> Vec<&str> { base.iter().chain(extra).copied().collect() };
        assert_eq!(
            own_message(&err(&with(&["--dataset", "imagenet"]))).as_deref(),
            Some("unknown dataset \"imagenet\"; expected \"cifar10\" or \"synthetic\"")
        );
        assert_eq!(
            own_message(&err(&with(&["--collective", "mpi"]))).as_deref(),
            Some("unknown collective \"mpi\"; expected \"auto\", \"ring\", \"gloo\" or \"nccl\"")
        );
        assert_eq!(
            own_message(&err(&with(&["--grad-compression", "fp8"]))).as_deref(),
            Some("unknown gradient compression \"fp8\"; expected \"none\", \"bf16\" or \"fp16\"")
        );
        assert_eq!(
            own_message(&err(&with(&["--device", "gpu"]))).as_deref(),
            Some("device \"gpu\" must be auto, cpu, cuda or cuda:K")
        );
        let precision = err(&with(&["--precision", "half"]));
        assert_eq!(own_message(&precision), None);
        assert_eq!(precision.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(precision.to_string().contains("[possible values: fp32, bf16, fp16]"), "{precision}");
        assert_eq!(own_message(&err(&with(&["--seed", "x"]))), None);
        let conflict = parse_job(&with(&["--amp", "--precision", "bf16"])).unwrap();
        assert_eq!(
            JobSpec::try_from(&conflict.job).unwrap_err().to_string(),
            "--amp means --precision fp16 and cannot be combined with --precision bf16"
        );
    }
}
