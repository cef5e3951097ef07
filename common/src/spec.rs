//! Job specification defaults and validation. Every field a user controls is checked here,
//! once, before the coordinator stores anything.

use crate::choices::{ChoiceError, Collective, Dataset, GradCompression, Precision};
pub use crate::choices::{CIFAR10_TEST, CIFAR10_TRAIN, SYNTHETIC_TEST, SYNTHETIC_TRAIN};
use crate::proto::JobSpec;

const MAX_EPOCHS: u32 = 10_000;
const MAX_BATCH: u32 = 65_536;
const MAX_WORKERS: u32 = 1_024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown model {0:?}; run `cvdist models` for the list")]
    UnknownModel(String),
    #[error("epochs must be between 1 and {MAX_EPOCHS}, got {0}")]
    Epochs(u32),
    #[error("batch size must be between 1 and {MAX_BATCH}, got {0}")]
    BatchSize(u32),
    #[error("learning rate must be a finite number in (0, 100], got {0}")]
    LearningRate(f64),
    #[error("momentum must be in [0, 1), got {0}")]
    Momentum(f64),
    #[error("weight decay must be a finite number >= 0, got {0}")]
    WeightDecay(f64),
    #[error("workers must be N or MIN:MAX with 1 <= MIN <= MAX <= {MAX_WORKERS}, got {0}")]
    Workers(String),
    #[error("job name {0:?} must be 1-64 characters from [A-Za-z0-9._-] and not start with '.'")]
    Name(String),
    #[error("{what} is {got}, but the training set has only {max} samples")]
    Samples { what: &'static str, got: u64, max: u64 },
    #[error("batch size {batch} is larger than each worker's shard of {shard} samples ({samples} samples over {workers} workers)")]
    BatchLargerThanShard { batch: u32, shard: u64, samples: u64, workers: u32 },
    #[error("warmup epochs ({warmup}) must be smaller than epochs ({epochs})")]
    Warmup { warmup: u32, epochs: u32 },
    #[error("--warmup-epochs {0} needs --scale-lr: warmup ramps from --lr up to lr × workers (Goyal et al. 2017), and without scaling there is no higher rate to ramp to")]
    WarmupWithoutScaling(u32),
    #[error("threads per worker must be at most 1024, got {0}")]
    Threads(u32),
    #[error("--amp means --precision fp16 and cannot be combined with --precision {0}")]
    AmpConflict(String),
    #[error("collective timeout must be between 1 and {MAX_COLLECTIVE_TIMEOUT_S} seconds, got {0}")]
    CollectiveTimeout(u32),
    #[error("--global-batch {batch} is not divisible by any worker count in --workers {workers}: each of N workers takes B/N samples, so N must divide {batch} (worker counts that do: {divisors})")]
    GlobalBatch { batch: u32, workers: String, divisors: String },
    /// A value outside a closed set (dataset, collective, precision, compression).
    #[error(transparent)]
    Choice(#[from] ChoiceError),
    #[error("bucket capacity must be between 1 and {MAX_BUCKET_CAP_MB} MB, got {0}")]
    BucketCap(u32),
}

/// Gradient bucket capacity (`--bucket-cap-mb`) over a TCP link (the ring, gloo): 4 MB,
/// smaller than PyTorch DDP's 25 MB `bucket_cap_mb`. Smaller buckets let the all-reduce
/// start earlier in backward and leave less of it after backward (the last bucket holds
/// the stem's gradients, ready last), at the cost of more all-reduce calls. Measured with
/// `scripts/bench-net.sh` (resnet18, two hosts, docs/BENCHMARKS.md "Two hosts over a shaped
/// link"): cvdist / DDP 0.92 → 0.72 at 100 Mbit/s and 0.80 → 0.73 at 1 Gbit/s going from 25
/// to 4 MB, unshaped 0.75 and 0.78 (noise).
pub const TCP_BUCKET_CAP_MB: u32 = 4;
/// Gradient bucket capacity on CUDA devices (NCCL): 25 MB, PyTorch DDP's `bucket_cap_mb`.
/// NVLink and InfiniBand move a bucket in well under a millisecond, so the number of calls
/// (each with a fixed launch and synchronisation cost) matters more than an early start:
/// ResNet-50's ~94 MB of gradients are 5 all-reduces per step instead of ~24 at 4 MB.
pub const NCCL_BUCKET_CAP_MB: u32 = 25;
/// Upper bound for `--bucket-cap-mb`: 1 GiB of f32 gradients is more than any zoo model has.
pub const MAX_BUCKET_CAP_MB: u32 = 1024;

/// The bucket capacity of `spec` in MB for a rank training on CUDA (`on_cuda`, NCCL's
/// [`NCCL_BUCKET_CAP_MB`]) or on a CPU ([`TCP_BUCKET_CAP_MB`]). 0, the default (and what
/// clients that predate the field send), picks by device; any other value is the user's.
/// Every rank of a group must come to the same capacity (the ranks compare their bucket
/// layouts before training), so a group mixing CUDA and CPU ranks needs an explicit one.
pub fn bucket_cap_mb(spec: &JobSpec, on_cuda: bool) -> u32 {
    match spec.bucket_cap_mb {
        0 if on_cuda => NCCL_BUCKET_CAP_MB,
        0 => TCP_BUCKET_CAP_MB,
        mb => mb,
    }
}

/// Seconds a rank waits for one collective (or for NCCL's initialisation) before it gives
/// the communicator up (`--collective-timeout`). PyTorch's ProcessGroupNCCL uses the same
/// default, 10 minutes: long enough for a first step that compiles kernels or a slow
/// checkpoint on another rank, short enough that a stalled peer does not hold a job for hours.
pub const DEFAULT_COLLECTIVE_TIMEOUT_S: u32 = 600;
/// Upper bound for `--collective-timeout` (one day): anything longer is a typo.
pub const MAX_COLLECTIVE_TIMEOUT_S: u32 = 86_400;

/// The collective timeout of `spec`; specs from clients that predate the field (0) get the
/// default.
pub fn collective_timeout(spec: &JobSpec) -> std::time::Duration {
    let secs = match spec.collective_timeout_s {
        0 => DEFAULT_COLLECTIVE_TIMEOUT_S,
        s => s,
    };
    std::time::Duration::from_secs(secs as u64)
}

/// The precision `spec` trains in: its `precision` field, or for specs from clients that
/// predate the field, fp16 when the legacy `amp` flag is set and fp32 otherwise.
/// `validate` has checked the field, so anything else cannot reach here; it reads as fp32.
pub fn precision(spec: &JobSpec) -> Precision {
    match spec.precision.as_str() {
        "" if spec.amp => Precision::Fp16,
        p => p.parse().unwrap_or_default(),
    }
}

/// Sets the precision from the command line: `--precision P` and the `--amp` alias
/// (= fp16). The legacy `amp` field is kept equal to "fp16 or not" so that an older worker
/// reading the spec trains in the same mode.
pub fn set_precision(spec: &mut JobSpec, precision: Option<Precision>, amp: bool) -> Result<(), SpecError> {
    let chosen = match (precision, amp) {
        (Some(p), true) if p != Precision::Fp16 => return Err(SpecError::AmpConflict(p.to_string())),
        (Some(p), _) => p,
        (None, true) => Precision::Fp16,
        (None, false) => Precision::Fp32,
    };
    spec.precision = chosen.to_string();
    spec.amp = chosen == Precision::Fp16;
    Ok(())
}

/// The standard CIFAR-10 recipe: SGD 0.1, momentum 0.9, wd 5e-4, batch 128, augmentation on.
pub fn default_spec(model: &str, epochs: u32) -> JobSpec {
    JobSpec {
        name: String::new(),
        model: model.to_string(),
        epochs,
        batch_size: 128,
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        min_workers: 1,
        max_workers: 1,
        dataset: Dataset::Cifar10.to_string(),
        train_samples: 0,
        test_samples: 0,
        seed: 0,
        scale_lr: false,
        warmup_epochs: 0,
        checkpoint_every_steps: 0,
        max_restarts: 3,
        threads_per_worker: 0,
        augment: true,
        amp: false,
        precision: Precision::Fp32.to_string(),
        channels_last: true,
        rendezvous_timeout_s: 0,
        collective: Collective::Auto.to_string(),
        collective_timeout_s: DEFAULT_COLLECTIVE_TIMEOUT_S,
        grad_compression: GradCompression::None.to_string(),
        bucket_cap_mb: 0,
        sync_bn: false,
        global_batch: 0,
    }
}

/// Parses `N` or `MIN:MAX`.
pub fn parse_workers(text: &str) -> Result<(u32, u32), SpecError> {
    let bad = || SpecError::Workers(text.to_string());
    let (min, max) = match text.split_once(':') {
        Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
        None => {
            let n = text.trim().parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if min == 0 || min > max || max > MAX_WORKERS {
        return Err(bad());
    }
    Ok((min, max))
}

pub use crate::names::valid_name;

/// The dataset `spec` names; `validate` has checked it, so anything else reads as CIFAR-10.
fn dataset(spec: &JobSpec) -> Dataset {
    spec.dataset.parse().unwrap_or_default()
}

/// Number of training samples a job uses.
pub fn train_len(spec: &JobSpec) -> u64 {
    let full = dataset(spec).sizes().0;
    if spec.train_samples == 0 {
        full
    } else {
        spec.train_samples
    }
}

/// Optimizer steps per epoch on each rank at `world_size` ranks: the rank's shard
/// (`sampler::samples_per_rank`, DistributedSampler's padding) in batches, the last one
/// partial. 0 for a world of 0 or a batch of 0.
pub fn steps_per_epoch(spec: &JobSpec, world_size: u32) -> u64 {
    let batch = per_rank_batch(spec, world_size);
    if batch == 0 {
        return 0;
    }
    let shard = crate::sampler::samples_per_rank(train_len(spec) as usize, world_size as usize) as u64;
    shard.div_ceil(u64::from(batch))
}

/// Samples each rank takes per step at `world_size` ranks: `--global-batch B` / N, or
/// `--batch-size` (then the global batch grows with the world size).
pub fn per_rank_batch(spec: &JobSpec, world_size: u32) -> u32 {
    match spec.global_batch {
        0 => spec.batch_size,
        b => b / world_size.max(1),
    }
}

/// The world sizes the job may run on: every size in `min..=max`, or with a global batch
/// those that divide it (each rank takes B/N samples).
pub fn allowed_world_sizes(spec: &JobSpec) -> Vec<u32> {
    (spec.min_workers..=spec.max_workers)
        .filter(|n| spec.global_batch == 0 || spec.global_batch.is_multiple_of(*n))
        .collect()
}

/// The job's batch as users set it: "batch B per worker", or "global batch B on 2 or 4
/// workers" (the world sizes it runs on).
pub fn batch_description(spec: &JobSpec) -> String {
    if spec.global_batch == 0 {
        return format!("batch {} per worker", spec.batch_size);
    }
    let sizes: Vec<String> = allowed_world_sizes(spec).iter().map(u32::to_string).collect();
    format!("global batch {} on {} workers", spec.global_batch, sizes.join(" or "))
}

/// The largest allowed world size with at most `available` workers; None when even the
/// smallest needs more.
pub fn world_size_for(spec: &JobSpec, available: u32) -> Option<u32> {
    allowed_world_sizes(spec).into_iter().rev().find(|&n| n <= available)
}

/// Number of test samples a job uses.
pub fn test_len(spec: &JobSpec) -> u64 {
    let full = dataset(spec).sizes().1;
    if spec.test_samples == 0 {
        full
    } else {
        spec.test_samples
    }
}

/// Checks every field; returns the first problem found.
pub fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    if !spec.name.is_empty() && !valid_name(&spec.name) {
        return Err(SpecError::Name(spec.name.clone()));
    }
    if !crate::models::is_known(&spec.model) {
        return Err(SpecError::UnknownModel(spec.model.clone()));
    }
    if spec.epochs == 0 || spec.epochs > MAX_EPOCHS {
        return Err(SpecError::Epochs(spec.epochs));
    }
    if spec.global_batch > MAX_BATCH {
        return Err(SpecError::BatchSize(spec.global_batch));
    }
    if spec.global_batch == 0 && (spec.batch_size == 0 || spec.batch_size > MAX_BATCH) {
        return Err(SpecError::BatchSize(spec.batch_size));
    }
    if !spec.lr.is_finite() || spec.lr <= 0.0 || spec.lr > 100.0 {
        return Err(SpecError::LearningRate(spec.lr));
    }
    if !spec.momentum.is_finite() || !(0.0..1.0).contains(&spec.momentum) {
        return Err(SpecError::Momentum(spec.momentum));
    }
    if !spec.weight_decay.is_finite() || spec.weight_decay < 0.0 {
        return Err(SpecError::WeightDecay(spec.weight_decay));
    }
    if spec.min_workers == 0 || spec.min_workers > spec.max_workers || spec.max_workers > MAX_WORKERS {
        return Err(SpecError::Workers(format!("{}:{}", spec.min_workers, spec.max_workers)));
    }
    let (full_train, full_test) = spec.dataset.parse::<Dataset>()?.sizes();
    if spec.train_samples > full_train {
        return Err(SpecError::Samples { what: "--train-samples", got: spec.train_samples, max: full_train });
    }
    if spec.test_samples > full_test {
        return Err(SpecError::Samples { what: "--test-samples", got: spec.test_samples, max: full_test });
    }
    spec.collective.parse::<Collective>()?;
    if spec.warmup_epochs >= spec.epochs && spec.warmup_epochs > 0 {
        return Err(SpecError::Warmup { warmup: spec.warmup_epochs, epochs: spec.epochs });
    }
    if spec.warmup_epochs > 0 && !spec.scale_lr {
        return Err(SpecError::WarmupWithoutScaling(spec.warmup_epochs));
    }
    if spec.threads_per_worker > 1024 {
        return Err(SpecError::Threads(spec.threads_per_worker));
    }
    // Empty: a spec from a client that predates the field (see [`precision`]).
    if !spec.precision.is_empty() {
        spec.precision.parse::<Precision>()?;
    }
    if spec.amp && !matches!(spec.precision.as_str(), "" | "fp16") {
        return Err(SpecError::AmpConflict(spec.precision.clone()));
    }
    // 0 is what older clients send (the field did not exist): it means the default.
    if spec.collective_timeout_s > MAX_COLLECTIVE_TIMEOUT_S {
        return Err(SpecError::CollectiveTimeout(spec.collective_timeout_s));
    }
    GradCompression::from_spec(spec)?;
    if spec.bucket_cap_mb > MAX_BUCKET_CAP_MB {
        return Err(SpecError::BucketCap(spec.bucket_cap_mb));
    }
    if spec.global_batch > 0 && allowed_world_sizes(spec).is_empty() {
        return Err(SpecError::GlobalBatch {
            batch: spec.global_batch,
            workers: if spec.min_workers == spec.max_workers {
                spec.min_workers.to_string()
            } else {
                format!("{}:{}", spec.min_workers, spec.max_workers)
            },
            divisors: divisors(spec.global_batch, 64),
        });
    }
    // The largest group takes the smallest per-rank batch; with a global batch the
    // smallest group's shard is the tightest fit.
    let tightest = if spec.global_batch > 0 {
        allowed_world_sizes(spec).last().copied().unwrap_or(spec.max_workers)
    } else {
        spec.max_workers
    };
    check_shard(spec, tightest)
}

/// The worker counts up to `limit` that divide `batch`, as a list for a message.
fn divisors(batch: u32, limit: u32) -> String {
    let all: Vec<String> = (1..=limit.min(batch)).filter(|n| batch.is_multiple_of(*n)).map(|n| n.to_string()).collect();
    all.join(", ")
}

/// The batch must fit in each worker's shard for the given world size.
pub fn check_shard(spec: &JobSpec, workers: u32) -> Result<(), SpecError> {
    let samples = train_len(spec);
    let shard = samples.div_ceil(workers.max(1) as u64);
    let batch = per_rank_batch(spec, workers);
    if u64::from(batch) > shard {
        return Err(SpecError::BatchLargerThanShard { batch, shard, samples, workers });
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// The default capacity follows the device (DDP's 25 MB on CUDA, the ring's measured
    /// 4 MB on CPUs); an explicit one is kept on both.
    #[test]
    fn bucket_capacity_defaults_by_device_and_keeps_an_explicit_one() {
        let spec = default_spec("resnet50", 1);
        assert_eq!(spec.bucket_cap_mb, 0);
        assert_eq!((bucket_cap_mb(&spec, true), bucket_cap_mb(&spec, false)), (25, 4));
        let spec = JobSpec { bucket_cap_mb: 7, ..spec };
        assert_eq!((bucket_cap_mb(&spec, true), bucket_cap_mb(&spec, false)), (7, 7));
    }
    use super::*;

    #[test]
    fn default_recipe_is_valid() {
        assert_eq!(validate(&default_spec("resnet50", 200)), Ok(()));
    }

    #[test]
    fn rejects_bad_fields_with_named_errors() {
        let base = default_spec("resnet20", 2);
        let cases: Vec<(JobSpec, &str)> = vec![
            (JobSpec { model: "resnet9000".into(), ..base.clone() }, "unknown model"),
            (JobSpec { epochs: 0, ..base.clone() }, "epochs"),
            (JobSpec { epochs: 1_000_000, ..base.clone() }, "epochs"),
            (JobSpec { batch_size: 0, ..base.clone() }, "batch size"),
            (JobSpec { lr: f64::NAN, ..base.clone() }, "learning rate"),
            (JobSpec { lr: f64::INFINITY, ..base.clone() }, "learning rate"),
            (JobSpec { momentum: 1.5, ..base.clone() }, "momentum"),
            (JobSpec { dataset: "imagenet".into(), ..base.clone() }, "unknown dataset"),
            (JobSpec { name: "../etc".into(), ..base.clone() }, "job name"),
            (JobSpec { min_workers: 3, max_workers: 2, ..base.clone() }, "workers"),
            (JobSpec { train_samples: 100, batch_size: 128, ..base.clone() }, "larger than each worker's shard"),
            (JobSpec { collective: "mpi".into(), ..base.clone() }, "collective"),
            (JobSpec { warmup_epochs: 1, scale_lr: false, ..base.clone() }, "--warmup-epochs 1 needs --scale-lr"),
            (JobSpec { precision: "fp8".into(), ..base.clone() }, "precision must be"),
            (JobSpec { precision: "bf16".into(), amp: true, ..base.clone() }, "--amp means --precision fp16"),
            (JobSpec { collective_timeout_s: 86_401, ..base.clone() }, "collective timeout must be between 1 and"),
            (
                JobSpec { bucket_cap_mb: 1025, ..base.clone() },
                "bucket capacity must be between 1 and 1024 MB, got 1025",
            ),
            (JobSpec { grad_compression: "fp8".into(), ..base.clone() }, "unknown gradient compression \"fp8\""),
        ];
        for (spec, needle) in cases {
            let err = validate(&spec).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
    }

    /// A global batch runs on the worker counts that divide it, each taking B/N, and a
    /// count range none of whose sizes divides it is refused in one line naming the ones that do.
    #[test]
    fn a_global_batch_runs_on_the_world_sizes_that_divide_it() {
        let s = JobSpec { global_batch: 128, min_workers: 2, max_workers: 6, ..default_spec("resnet20", 1) };
        assert_eq!(validate(&s), Ok(()));
        assert_eq!(allowed_world_sizes(&s), [2, 4]);
        assert_eq!((world_size_for(&s, 1), world_size_for(&s, 3), world_size_for(&s, 9)), (None, Some(2), Some(4)));
        assert_eq!((per_rank_batch(&s, 2), per_rank_batch(&s, 4)), (64, 32));
        assert_eq!(steps_per_epoch(&s, 2), steps_per_epoch(&s, 4), "the same steps at any allowed size");
        let odd = JobSpec { min_workers: 3, max_workers: 3, ..s.clone() };
        assert_eq!(
            validate(&odd).unwrap_err().to_string(),
            "--global-batch 128 is not divisible by any worker count in --workers 3: each of N workers takes B/N samples, so N must divide 128 (worker counts that do: 1, 2, 4, 8, 16, 32, 64)"
        );
        let per_rank = default_spec("resnet20", 1);
        assert_eq!((per_rank_batch(&per_rank, 4), world_size_for(&per_rank, 7)), (128, Some(1)));
    }

    /// `--amp` is an alias of `--precision fp16`; specs from older clients (no precision
    /// field) keep their meaning.
    #[test]
    fn precision_flags_and_the_amp_alias() {
        let mut s = default_spec("resnet20", 1);
        assert_eq!(precision(&s), Precision::Fp32);
        set_precision(&mut s, Some(Precision::Bf16), false).unwrap();
        assert_eq!((precision(&s), s.amp), (Precision::Bf16, false));
        set_precision(&mut s, None, true).unwrap();
        assert_eq!((precision(&s), s.amp), (Precision::Fp16, true));
        set_precision(&mut s, Some(Precision::Fp16), true).unwrap();
        assert_eq!(precision(&s), Precision::Fp16);
        assert_eq!(set_precision(&mut s, Some(Precision::Bf16), true), Err(SpecError::AmpConflict("bf16".into())));
        assert_eq!(
            validate(&JobSpec { precision: "half".into(), ..s.clone() }),
            Err(SpecError::Choice(ChoiceError::Precision("half".into())))
        );
        let legacy = JobSpec { precision: String::new(), amp: true, ..default_spec("resnet20", 1) };
        assert_eq!((precision(&legacy), validate(&legacy)), (Precision::Fp16, Ok(())));
        let legacy = JobSpec { precision: String::new(), ..default_spec("resnet20", 1) };
        assert_eq!(precision(&legacy), Precision::Fp32);
    }

    /// Default 600 s; 0 (a spec from a client without the field) reads as the default.
    #[test]
    fn collective_timeout_default_and_legacy_zero() {
        let s = default_spec("resnet20", 1);
        assert_eq!(s.collective_timeout_s, 600);
        assert_eq!(collective_timeout(&s), std::time::Duration::from_secs(600));
        let legacy = JobSpec { collective_timeout_s: 0, ..s.clone() };
        assert_eq!((collective_timeout(&legacy).as_secs(), validate(&legacy)), (600, Ok(())));
        let short = JobSpec { collective_timeout_s: 5, ..s };
        assert_eq!(collective_timeout(&short).as_secs(), 5);
    }

    #[test]
    fn parses_worker_ranges() {
        assert_eq!(parse_workers("4"), Ok((4, 4)));
        assert_eq!(parse_workers("2:3"), Ok((2, 3)));
        assert!(parse_workers("0").is_err());
        assert!(parse_workers("3:2").is_err());
        assert!(parse_workers("x").is_err());
    }
}
