//! The training loop of one rank. With a world size of 1 it is the bare single-worker
//! trainer; with more, gradients are averaged through a [`Collective`] every step, so N
//! ranks with batch b see the samples and average the gradients one rank with batch N·b
//! would. BatchNorm in training mode still normalises over each rank's own batch, so the
//! steps are only the same with `freeze_bn` (docs/ARCHITECTURE.md, "N workers × batch b").

use super::buckets::Buckets;
use super::checkpoint::{self, CheckpointState};
use super::ckpt_writer::{BackgroundWriter, CheckpointStore, Done};
use super::divergence::{DivergenceRecord, FirstDivergence, CHECK_EVERY_STEPS};
use super::live_state::{Keeper, LiveSlot, LiveStart};
use super::metrics::{DeviceSums, StepOutput};
use super::overlap::{self, GradHooks, Lane, FIRST_BUCKET_ELEMS};
use super::position::Position;
use super::precision::{self, Precision};
use super::scaler::{GradScaler, ScalerState};
use super::schedule::learning_rate;
use super::sgd::Sgd;
use super::sync::{self, GradSync, Reduced};
use crate::collective::{Collective, CollectiveError};
use crate::data::loader::Loader;
use crate::models;
use cvdist_common::cifar::CifarSplit;
use cvdist_common::proto::{EpochMetrics, FailureKind, JobSpec, Progress};
use cvdist_common::sampler;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use tracing::{info, info_span, warn};

/// Images per evaluation batch (the reference recipe's test loader uses 100).
const EVAL_BATCH: usize = 100;

pub struct TrainerConfig {
    pub spec: JobSpec,
    pub device: Device,
    pub rank: usize,
    pub world_size: usize,
    /// Where checkpoints are written; only rank 0 writes. None disables checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// A checkpoint JSON record to resume from.
    pub resume: Option<PathBuf>,
    pub progress_interval: Duration,
    /// Run BatchNorm on its running statistics (as in eval mode) and leave them unchanged,
    /// so a step does not depend on how the batch is composed: used for fine-tuning
    /// with small per-worker batches and for exact data-parallel equivalence checks.
    pub freeze_bn: bool,
}

use crate::data::Datasets;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(String),
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("training diverged at epoch {epoch} step {step}: {what} is {loss}")]
    Diverged { epoch: u32, step: u64, what: &'static str, loss: f64 },
    #[error(
        "training diverged at epoch {epoch} step {step}: the fp16 loss scaler skipped {skipped} steps in a row \
         from there (gradients non-finite at every loss scale down to {scale:e})"
    )]
    ScalerExhausted { epoch: u32, step: u64, skipped: u32, scale: f64 },
    #[error("stopped: {0}")]
    Stopped(String),
}

impl From<crate::data::DataError> for TrainError {
    fn from(e: crate::data::DataError) -> TrainError {
        TrainError::Data(e.to_string())
    }
}

impl From<sync::SyncError> for TrainError {
    fn from(e: sync::SyncError) -> TrainError {
        match e {
            sync::SyncError::Collective(e) => TrainError::Collective(e),
            sync::SyncError::Torch(e) => TrainError::Torch(e),
        }
    }
}

impl TrainError {
    /// Whether running the same attempt again could end differently; the coordinator only
    /// restarts a group for [`FailureKind::Retryable`] failures.
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            // Every step is a deterministic function of the checkpoint it started from
            // (docs/ARCHITECTURE.md, Determinism): a rerun diverges at the same step.
            TrainError::Diverged { .. } | TrainError::ScalerExhausted { .. } => FailureKind::Diverged,
            TrainError::Data(_) => FailureKind::Data,
            // The model named by the spec cannot be built by this worker.
            TrainError::Model(_) => FailureKind::Configuration,
            TrainError::Collective(CollectiveError::NcclUnavailable(_) | CollectiveError::Config(_)) => {
                FailureKind::Configuration
            }
            // A checkpoint written for another model or shape stays wrong on every retry.
            TrainError::Checkpoint(checkpoint::CheckpointError::Mismatch { .. }) => FailureKind::Configuration,
            // Lost peers, timeouts, aborts, I/O and libtorch errors (e.g. out of memory
            // because of another process) may not recur.
            TrainError::Collective(_) | TrainError::Checkpoint(_) | TrainError::Torch(_) | TrainError::Stopped(_) => {
                FailureKind::Retryable
            }
        }
    }
}

/// Receives what the loop produces. Every method has a no-op default.
pub trait Observer {
    fn progress(&mut self, _p: &Progress) {}
    fn epoch(&mut self, _m: &EpochMetrics) {}
    /// Called on rank 0 (on the training thread) once a checkpoint is durably written; the
    /// write runs in the background, so this comes at a later step, the next checkpoint
    /// or the end of training.
    fn checkpoint(&mut self, _json: &Path, _state: &CheckpointState) {}
    /// Where written checkpoints go next (an upload): the function runs on the checkpoint
    /// writer thread, after the write. Asked on rank 0 for every checkpoint.
    fn checkpoint_store(&mut self) -> Option<CheckpointStore> {
        None
    }
    /// The store function's result for checkpoint `name`, on the training thread, after
    /// [`Observer::checkpoint`] for it.
    fn checkpoint_stored(&mut self, _name: &str, _result: &Result<(), String>) {}
    /// Polled every step; `Some(reason)` ends training with [`TrainError::Stopped`].
    fn should_stop(&mut self) -> Option<String> {
        None
    }
    /// The dataset indices of every batch this rank trains on, for sample-level audits.
    fn batch_indices(&mut self, _epoch: u32, _step: u64, _indices: &[usize]) {}
    /// Fault injection for tests: `true` makes this rank's loss at (`epoch`, `step`) NaN,
    /// as a diverged run's would be.
    fn poison_loss(&mut self, _epoch: u32, _step: u64) -> bool {
        false
    }
}

pub struct NoObserver;
impl Observer for NoObserver {}

pub struct TrainOutcome {
    pub history: Vec<EpochMetrics>,
    pub wall_seconds: f64,
    /// Why the checkpoint after the last epoch could not be written (rank 0 with a
    /// checkpoint directory only): the run trained to the end but its final model is not
    /// on disk, so it must not be reported as a plain success.
    pub final_checkpoint_error: Option<String>,
    /// Final weights and buffers by name (CPU), e.g. for tests and export.
    pub variables: Vec<(String, Tensor)>,
}

/// Loss-scaler skips in a row after which an fp16 run counts as diverged. Each skip halves
/// the scale (GradScaler's backoff factor), so 32 skips take it down by 2^32 (from the
/// initial 2^16 to 2^-16): an overflow that survives that is no scaling artefact but a
/// forward pass or gradients that are non-finite on every batch. torch.amp's GradScaler
/// would skip such steps for ever without training.
pub const MAX_SKIPPED_IN_A_ROW: u32 = 32;

/// Everything needed to run steps of one model; exposed so benchmarks time the real step.
pub struct Engine {
    pub vs: VarStore,
    pub model: Box<dyn ModuleT + Send>,
    pub sgd: Sgd,
    pub buffers: Vec<(String, Tensor)>,
    device: Device,
    /// The precision that runs on `device` (fp16 asked on a CPU runs as fp32).
    pub precision: Precision,
    channels_last: bool,
    pub freeze_bn: bool,
    /// Dynamic loss scaling, present exactly when the run is fp16.
    pub scaler: Option<GradScaler>,
    /// The steps' agreed divergence flags since the last check, on the device.
    pub divergence: DivergenceRecord,
    /// The first of the steps the loss scaler has skipped in a row, and how many.
    skipped: Option<((u32, u64), u32)>,
    /// Gradient-ready hooks on every parameter, installed by [`Engine::overlapped_sync`]
    /// (only runs with a comm thread, which overlap the all-reduce with backward, pay for
    /// them).
    hooks: Option<GradHooks>,
}

/// tch has no memory-format API: a permuted contiguous copy has NHWC strides while keeping
/// NCHW semantics, which is exactly what channels_last means to libtorch.
fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

impl Engine {
    pub fn new(spec: &JobSpec, device: Device) -> Result<Engine, TrainError> {
        crate::device::configure(device);
        // libtorch's generator is process-wide: ranks sharing a process (tests, benchmarks)
        // must not interleave their seeded initialisations.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(spec.seed as i64);
        let vs = VarStore::new(device);
        let model = models::build(&spec.model, &vs.root(), 10).map_err(|e| TrainError::Model(e.to_string()))?;
        drop(guard);
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        // A fixed order is what lets every rank pack gradients identically.
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut params, mut buffers): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(_, t)| t.requires_grad());
        // On CPU as well as CUDA: oneDNN convolves NHWC tensors without reordering
        // activations and weights on every call (docs/BENCHMARKS.md, step time).
        if spec.channels_last {
            tch::no_grad(|| {
                for (_, t) in params.iter_mut().chain(buffers.iter_mut()) {
                    if t.dim() == 4 {
                        let nhwc = to_channels_last(t);
                        t.set_data(&nhwc);
                    }
                }
            });
        }
        // Buckets in the order backward finishes the gradients, a small first one, so the
        // first all-reduce can start early in backward (train::overlap).
        let order =
            overlap::ready_order(&params, model.as_ref(), device).map_err(|e| TrainError::Model(e.to_string()))?;
        // `--bucket-cap-mb` (DDP's bucket_cap_mb, by default per device); the first bucket
        // stays at most 1 MB.
        let cap = cvdist_common::spec::bucket_cap_mb(spec, device.is_cuda()) as usize * 1024 * 1024 / 4;
        let buckets = Buckets::in_order(&params, &order, FIRST_BUCKET_ELEMS.min(cap), cap)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        let sgd = Sgd::with_buckets(params, buckets, spec.momentum, spec.weight_decay);
        let asked = Precision::parse(cvdist_common::spec::precision(spec));
        let precision = asked.effective(device);
        if precision != asked {
            warn!("fp16 mixed precision (--amp) is a CUDA mode; this CPU run trains in fp32 (bf16 works on CPU: --precision bf16)");
        }
        Ok(Engine {
            vs,
            model,
            sgd,
            buffers,
            device,
            precision,
            channels_last: spec.channels_last,
            freeze_bn: false,
            scaler: (precision == Precision::Fp16).then(|| GradScaler::new(device)),
            divergence: DivergenceRecord::new(device)?,
            skipped: None,
            hooks: None,
        })
    }

    /// Stops the gradient hooks feeding their comm thread ([`GradHooks::disconnect`]);
    /// the next [`Engine::overlapped_sync`] connects them again.
    pub fn disconnect_hooks(&self) {
        if let Some(hooks) = &self.hooks {
            hooks.disconnect();
        }
    }

    /// A [`GradSync`] whose all-reduce runs on `lane`'s comm thread while backward
    /// computes ([`overlap::with_comm_thread`]): installs the gradient-ready hooks (once
    /// per engine, removed when it drops; a later call connects the same hooks to its
    /// `lane`). Pass that thread's proxy as the `comm` of [`Engine::finish_step`].
    ///
    /// Errors: libtorch refused a hook.
    pub fn overlapped_sync(&mut self, lane: Lane) -> Result<GradSync, TrainError> {
        // An engine kept from a failed attempt has its hooks: they now feed
        // this attempt's comm thread.
        if let Some(hooks) = &self.hooks {
            return Ok(GradSync::overlapped(hooks.connect(lane)));
        }
        let hooks =
            GradHooks::register(self.sgd.params(), self.sgd.buckets()).map_err(|e| TrainError::Model(e.to_string()))?;
        let sync = GradSync::overlapped(hooks.connect(lane));
        self.hooks = Some(hooks);
        Ok(sync)
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Parameters then buffers, sorted by name.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> =
            self.sgd.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        all.extend(self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// `t` on the training device. From the loader's page-locked batches (CUDA runs) the
    /// copy is asynchronous: the host goes on enqueueing kernels while it runs, and
    /// libtorch's pinned-memory allocator keeps the source alive until it completes. On
    /// the CPU this is the tensor itself.
    fn to_device(&self, t: &Tensor) -> Tensor {
        t.to_device_(self.device, t.kind(), self.device.is_cuda(), false)
    }

    fn prepare(&self, images: &Tensor) -> Tensor {
        let x = self.to_device(images);
        if self.channels_last {
            to_channels_last(&x)
        } else {
            x
        }
    }

    /// Forward and backward of one batch; returns its mean loss and correct count as
    /// tensors on the device, without waiting for them (nothing is read back: the trainer
    /// adds them up on the device, `super::metrics`).
    pub fn forward_backward(&mut self, images: &Tensor, labels: &Tensor) -> StepOutput {
        self.sgd.zero_grad();
        let x = self.prepare(images);
        let y = self.to_device(labels);
        let train = !self.freeze_bn;
        let logits = precision::autocast(self.device, self.precision, || self.model.forward_t(&x, train));
        let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(&y);
        match &self.scaler {
            Some(scaler) => scaler.scale_loss(&loss).backward(),
            None => loss.backward(),
        }
        let correct = logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Double);
        StepOutput { loss: loss.detach(), correct }
    }

    /// Averages the gradients over the ranks, agrees whether any rank's `loss` (the step's
    /// mean loss, on the device) is non-finite, and applies the SGD step unless the loss
    /// scaler found an overflow (then weights and momentum stay as they were, as
    /// torch.cuda.amp.GradScaler skips the step). Returns the all-reduce seconds and
    /// whether the step was applied. The agreed divergence flag of step `at` is recorded
    /// on the device, not read: [`Engine::check_divergence`] turns a non-finite loss on
    /// any rank into [`TrainError::Diverged`] on every rank, with the same value.
    pub fn finish_step(
        &mut self,
        grad_sync: &mut GradSync,
        comm: &mut dyn Collective,
        loss: &Tensor,
        lr: f64,
        at: (u32, u64),
    ) -> Result<(f64, bool), TrainError> {
        let reduced = self.reduce_gradients(grad_sync, comm, loss)?;
        self.apply(reduced, lr, at)
    }

    /// The first half of [`Engine::finish_step`]: the gradient all-reduce (and loss-scale
    /// check); weights and momentum are not touched yet, so a failure here leaves them at
    /// the last complete step.
    pub fn reduce_gradients(
        &mut self,
        grad_sync: &mut GradSync,
        comm: &mut dyn Collective,
        loss: &Tensor,
    ) -> Result<Reduced, TrainError> {
        Ok(grad_sync.reduce(self.sgd.buckets_mut(), comm, loss, self.scaler.as_mut())?)
    }

    /// The second half of [`Engine::finish_step`]: records the agreed divergence flag of
    /// step `at` and applies the SGD step unless the scaler skipped it.
    ///
    /// A skipped step records no divergence: as with torch.amp's GradScaler, an fp16
    /// overflow (in the forward pass too, which makes the loss itself non-finite) skips the
    /// step and backs the scale off, and training goes on. Only [`MAX_SKIPPED_IN_A_ROW`]
    /// skips in a row end the run, as [`TrainError::ScalerExhausted`]: every rank takes the
    /// same skip decisions (from the all-reduced gradients), so every rank ends at the same
    /// step.
    pub fn apply(&mut self, reduced: Reduced, lr: f64, at: (u32, u64)) -> Result<(f64, bool), TrainError> {
        if reduced.apply {
            self.divergence.record(&reduced.flag, at)?;
            self.sgd.step(lr);
            self.skipped = None;
            return Ok((reduced.wire, true));
        }
        let (first, count) = self.skipped.get_or_insert((at, 0));
        *count += 1;
        if *count >= MAX_SKIPPED_IN_A_ROW {
            let scale = self.scaler.as_ref().map_or(f64::NAN, |s| s.state().scale);
            return Err(TrainError::ScalerExhausted { epoch: first.0, step: first.1, skipped: *count, scale });
        }
        Ok((reduced.wire, false))
    }

    /// Reads the divergence record (one value back from the device): the first step since
    /// the last check at which any rank's loss was non-finite is
    /// [`TrainError::Diverged`], the same on every rank when every rank checks after the
    /// same steps.
    pub fn check_divergence(&mut self) -> Result<(), TrainError> {
        match self.divergence.check()? {
            None => Ok(()),
            Some(FirstDivergence { epoch, step, loss }) => {
                Err(TrainError::Diverged { epoch, step, what: "loss", loss })
            }
        }
    }

    /// Sums (loss·samples, correct, seen) over `indices` of `split` (no augmentation),
    /// on the device, read back once at the end; stops early (partial sums) once
    /// `observer.should_stop()` says so, because a whole test pass can take seconds.
    fn evaluate(
        &self,
        split: &Arc<CifarSplit>,
        indices: Vec<usize>,
        observer: &mut dyn Observer,
    ) -> Result<(f64, f64, f64), TrainError> {
        let mut sums = DeviceSums::new(self.device, 0.0, 0.0)?;
        let mut seen = 0.0;
        let loader = Loader::for_device(self.device, split.clone(), indices, EVAL_BATCH, 0, 0, false, 0);
        tch::no_grad(|| -> Result<(), TrainError> {
            for batch in loader {
                if observer.should_stop().is_some() {
                    break;
                }
                let x = self.prepare(&batch.images);
                let y = self.to_device(&batch.labels);
                let logits = precision::autocast(self.device, self.precision, || self.model.forward_t(&x, false))
                    .to_kind(Kind::Float);
                let n = y.size()[0];
                let correct = logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Double);
                sums.add(&logits.cross_entropy_for_logits(&y), &correct, n)?;
                seen += n as f64;
            }
            Ok(())
        })?;
        let (loss_sum, correct) = sums.read()?;
        Ok((loss_sum, correct, seen))
    }
}

/// Runs the job from its start (or `cfg.resume`) to its last epoch. With more than one
/// rank, `comm` moves to a communication thread for the run, which all-reduces gradient
/// buckets while backward computes (train::overlap); every collective goes through it.
pub fn train(
    cfg: &TrainerConfig,
    data: &Datasets,
    comm: &mut dyn Collective,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome, TrainError> {
    train_from(cfg, data, comm, observer, None, None)
}

/// [`train`], continuing from `live` (a member's in-memory state) instead of
/// `cfg.resume` when given, and leaving the state of the last complete step in `keep`
/// (slot, job id, attempt) when training ends with an error.
pub fn train_from(
    cfg: &TrainerConfig,
    data: &Datasets,
    comm: &mut dyn Collective,
    observer: &mut dyn Observer,
    live: Option<LiveStart>,
    keep: Option<(LiveSlot, String, u32)>,
) -> Result<TrainOutcome, TrainError> {
    if comm.world_size() == 1 {
        return train_on(cfg, data, comm, None, observer, live, keep);
    }
    overlap::with_comm_thread(comm, cfg.device, |proxy, lane| {
        train_on(cfg, data, proxy, Some(lane), observer, live, keep)
    })?
}

fn train_on(
    cfg: &TrainerConfig,
    data: &Datasets,
    comm: &mut dyn Collective,
    lane: Option<Lane>,
    observer: &mut dyn Observer,
    live: Option<LiveStart>,
    keep: Option<(LiveSlot, String, u32)>,
) -> Result<TrainOutcome, TrainError> {
    let spec = &cfg.spec;
    let started = Instant::now();
    let batch = spec.batch_size as usize;
    let train_len = data.train.len();
    let world = cfg.world_size as u32;
    // A group continuing from a live state reports its first step at once: that report
    // ends the recovery's measured downtime on the coordinator.
    let report_first = live.is_some();
    // Where a live state continues; without one, `start_engine` says (below, once the
    // gradient hooks are in place on every rank).
    let (mut engine, live_at) = match live {
        Some(l) => (l.engine, Some((l.at.continue_on(world, train_len, batch), l.partial))),
        None => (Engine::new(spec, cfg.device)?, None),
    };
    engine.freeze_bn = cfg.freeze_bn;
    let mut grad_sync = match lane {
        Some(lane) => {
            overlap::check_same_layout(engine.sgd.buckets(), comm)?;
            engine.overlapped_sync(lane)?
        }
        None => GradSync::new(),
    };
    let (start_at, partial) = match live_at {
        Some(at) => at,
        None => {
            let (epoch, step, partial) = start_engine(cfg, &mut engine, comm)?;
            (Position { steps: step, ..Position::epoch_start(epoch, world) }, partial)
        }
    };
    let mut engine = Keeper::new(engine, keep, start_at, partial)?;
    let start_epoch = start_at.epoch;

    let scale = if spec.scale_lr { cfg.world_size as f64 } else { 1.0 };
    let mut history = Vec::new();
    let mut final_checkpoint_error = None;
    let final_name = checkpoint::name_for(spec.epochs, 0);
    let mut writer = BackgroundWriter::default();

    for epoch in start_epoch..spec.epochs {
        let span = info_span!("epoch", epoch, rank = cfg.rank);
        let _enter = span.enter();
        let epoch_start = Instant::now();
        // The epoch's samples: its DistributedSampler shard, or after a world-size change
        // mid-epoch the rest of its order re-sharded (`position`).
        let at = if epoch == start_epoch { start_at } else { Position::epoch_start(epoch, world) };
        let segment = at.segment(train_len, cfg.rank, spec.seed, batch);
        let steps_per_epoch = segment.steps_per_epoch;
        let skip = at.step(batch);
        let [loss_sum, correct, mut seen, prior_seconds, mut wire_seconds] =
            if epoch == start_epoch { partial } else { [0.0; 5] };
        // Σ loss·samples and Σ correct stay on the device and are read back only where
        // a value is needed (progress line, checkpoint, epoch end); `seen` is known here.
        let mut sums = DeviceSums::new(cfg.device, loss_sum, correct)?;
        let mut last_report = match Instant::now().checked_sub(cfg.progress_interval) {
            Some(past) if report_first && epoch == start_epoch => past,
            _ => Instant::now(),
        };
        let mut steps_since_report = 0u32;
        let loader = Loader::for_device(
            cfg.device,
            data.train.clone(),
            segment.indices,
            batch,
            spec.seed,
            epoch as u64,
            spec.augment,
            at.steps as usize,
        );
        let mut step = skip;
        let mut lr = learning_rate(spec.lr, epoch, spec.epochs, step, steps_per_epoch, scale, spec.warmup_epochs);
        for batch in loader {
            if let Some(reason) = observer.should_stop() {
                return Err(TrainError::Stopped(reason));
            }
            observer.batch_indices(epoch, step, &batch.indices);
            if let Some(done) = writer.poll() {
                deliver(done, observer, &final_name, &mut final_checkpoint_error);
            }
            lr = learning_rate(spec.lr, epoch, spec.epochs, step, steps_per_epoch, scale, spec.warmup_epochs);
            let mut out = engine.forward_backward(&batch.images, &batch.labels);
            if observer.poison_loss(epoch, step) {
                out.loss = out.loss.full_like(f64::NAN);
            }
            // Every rank learns in the gradient all-reduce whether any rank's loss is
            // non-finite (in every precision: the fp16 loss is computed in fp32 and does
            // not depend on the scale, so a non-finite one is a real overflow, not a
            // scaling artefact). The agreed flag is recorded on the device and read at the
            // check points below, which are the same steps on every rank: all stop there
            // with the same error, naming the step that diverged first.
            // The sums as they stand once this step completes: a survivor keeps them, and
            // the step's BatchNorm average gathers every rank's (live_state::Keeper).
            let n = batch.labels.size()[0];
            sums.add(&out.loss, &out.correct, n)?;
            seen += n as f64;
            let after = Position { steps: at.steps + (step - skip) + 1, ..at };
            let (wire, _applied) =
                engine.finish_step(&mut grad_sync, comm, &out.loss, lr, (epoch, step), after, &sums, seen)?;
            wire_seconds += wire;
            step += 1;
            steps_since_report += 1;
            let elapsed = prior_seconds + epoch_start.elapsed().as_secs_f64();
            let confirm = if engine.keeps() { comm.completion() } else { None };
            engine.commit(after, &sums, [seen, elapsed, wire_seconds], confirm);
            let every = spec.checkpoint_every_steps as u64;
            // Not in a re-sharded remainder of an epoch: a checkpoint's position is a step
            // of the epoch's own shards (a resume from it restarts such an epoch instead).
            let checkpoint_due = every > 0 && step % every == 0 && step < steps_per_epoch && at.base == 0;
            if step % CHECK_EVERY_STEPS == 0 || step == steps_per_epoch || checkpoint_due {
                engine.check_divergence()?;
            }
            if cfg.rank == 0 && (last_report.elapsed() >= cfg.progress_interval || step == steps_per_epoch) {
                // The one read of a progress interval: it waits for the queued steps, so
                // the time since the last report, over its steps, is the step time.
                let (loss_sum, correct) = sums.read()?;
                let step_seconds = last_report.elapsed().as_secs_f64() / f64::from(steps_since_report.max(1));
                last_report = Instant::now();
                steps_since_report = 0;
                let elapsed = prior_seconds + epoch_start.elapsed().as_secs_f64();
                observer.progress(&Progress {
                    epoch,
                    step,
                    steps_per_epoch,
                    loss: loss_sum / seen,
                    acc: correct / seen,
                    images_per_sec: seen * cfg.world_size as f64 / elapsed.max(1e-9),
                    step_seconds,
                    allreduce_seconds: wire,
                });
            }
            if checkpoint_due {
                // Exact partial sums: the resumed epoch must add up to the same totals.
                let (loss_sum, correct) = sums.read()?;
                let acc = [loss_sum, correct, seen, prior_seconds + epoch_start.elapsed().as_secs_f64(), wire_seconds];
                if let Some(done) = write_checkpoint(cfg, &mut engine, comm, observer, &mut writer, epoch, step, acc)? {
                    deliver(done, observer, &final_name, &mut final_checkpoint_error);
                }
                // The checkpoint averaged the statistics once more (a no-op up to rounding).
                engine.refresh_statistics();
            }
        }
        // Normally done at the last step already; reads nothing when it was.
        engine.check_divergence()?;
        let (loss_sum, correct) = sums.read()?;
        let train_seconds = prior_seconds + epoch_start.elapsed().as_secs_f64();

        sync::average_running_stats(&engine.buffers, comm)?;
        let eval_range = sampler::eval_indices(data.test.len(), cfg.world_size, cfg.rank);
        let (test_loss_sum, test_correct, test_seen) = engine.evaluate(&data.test, eval_range.collect(), observer)?;
        if let Some(reason) = observer.should_stop() {
            return Err(TrainError::Stopped(reason));
        }
        let mut totals = [loss_sum, correct, seen, test_loss_sum, test_correct, test_seen];
        sync::sum_metrics(&mut totals, comm)?;
        let [loss_sum, correct, seen, test_loss_sum, test_correct, test_seen] = totals;
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen.max(1.0),
            train_acc: correct / seen.max(1.0),
            test_loss: test_loss_sum / test_seen.max(1.0),
            test_acc: test_correct / test_seen.max(1.0),
            lr,
            seconds: prior_seconds + epoch_start.elapsed().as_secs_f64(),
            images_per_sec: seen / train_seconds.max(1e-9),
            world_size: cfg.world_size as u32,
            allreduce_seconds: wire_seconds,
            attempt: 0,
        };
        info!(
            train_loss = metrics.train_loss,
            train_acc = metrics.train_acc,
            test_acc = metrics.test_acc,
            seconds = metrics.seconds,
            "epoch done"
        );
        // The last update of an epoch can turn the weights into NaN without any training
        // loss showing it (with one step per epoch, never): the test loss does. Every
        // non-finite step loss stops the run at once (above), so this is a second guard
        // for what the step checks cannot see. The epoch is still recorded (non-finite
        // values are stored as described in cvdist_common::nonfinite), but no checkpoint
        // of the diverged weights is kept.
        let diverged = if !metrics.test_loss.is_finite() {
            Some(("test loss", metrics.test_loss))
        } else if !metrics.train_loss.is_finite() {
            Some(("training loss", metrics.train_loss))
        } else {
            None
        };
        if let Some((what, loss)) = diverged {
            observer.epoch(&metrics);
            return Err(TrainError::Diverged { epoch, step: steps_per_epoch, what, loss });
        }
        if let Some(done) = write_checkpoint(cfg, &mut engine, comm, observer, &mut writer, epoch + 1, 0, [0.0; 5])? {
            deliver(done, observer, &final_name, &mut final_checkpoint_error);
        }
        let confirm = if engine.keeps() { comm.completion() } else { None };
        engine.commit(
            Position::epoch_start(epoch + 1, world),
            &DeviceSums::new(cfg.device, 0.0, 0.0)?,
            [0.0; 3],
            confirm,
        );
        observer.epoch(&metrics);
        history.push(metrics);
    }
    // The run is only over once its last checkpoint is written and stored (or known not
    // to be): the final-checkpoint rule reads the outcome.
    if let Some(done) = writer.wait() {
        deliver(done, observer, &final_name, &mut final_checkpoint_error);
    }
    engine.release();
    let variables = engine.variables().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))).collect();
    Ok(TrainOutcome { history, wall_seconds: started.elapsed().as_secs_f64(), final_checkpoint_error, variables })
}

/// Restores `engine` from `cfg.resume`'s checkpoint, or gives every rank rank 0's initial
/// weights. Returns the epoch and step to start at and this rank's sums of the partially
/// trained epoch (loss·samples, correct, samples, seconds, all-reduce seconds).
fn start_engine(
    cfg: &TrainerConfig,
    engine: &mut Engine,
    comm: &mut dyn Collective,
) -> Result<(u32, u64, [f64; 5]), TrainError> {
    let (mut start_epoch, mut start_step, mut partial) = (0u32, 0u64, [0.0f64; 5]);
    if let Some(path) = &cfg.resume {
        let ckpt = checkpoint::load(path)?;
        checkpoint::restore_into(path, &ckpt.model, &engine.variables())?;
        engine
            .sgd
            .load_momentum_buffers(ckpt.momentum)
            .map_err(|reason| checkpoint::CheckpointError::Mismatch { path: path.clone(), reason })?;
        // An fp16 run continues with the saved scale and growth tracker (bit-identical
        // resume). Checkpoints written before the tracker was saved carry the scale alone
        // (the tracker restarts at 0); ones from an fp32/bf16 run (or imported ones) carry
        // no scaler and the run starts from the initial scale.
        if let Some(scaler) = engine.scaler.as_mut() {
            let saved = match ckpt.state.grad_scaler {
                Some(state) => Some(state),
                None if ckpt.state.loss_scale > 1.0 => {
                    Some(ScalerState { scale: ckpt.state.loss_scale, growth_tracker: 0 })
                }
                None => None,
            };
            if let Some(state) = saved {
                *scaler = GradScaler::from_state(cfg.device, state);
            }
        }
        start_epoch = ckpt.state.epoch;
        start_step = ckpt.state.step;
        // Accumulators of a partial epoch only carry over at the same world size; at another
        // size the remaining steps differ anyway.
        if ckpt.state.world_size as usize == cfg.world_size {
            // Each rank continues its own sums; the epoch's totals are summed over the
            // ranks at its end, exactly as in an uninterrupted run.
            partial = match ckpt.state.rank_partials.get(cfg.rank) {
                Some(own) if ckpt.state.rank_partials.len() == cfg.world_size => *own,
                _ => {
                    let [l, c, n, t] = ckpt.state.partial;
                    if cfg.world_size > 1 && ckpt.state.step > 0 {
                        warn!("checkpoint predates per-rank sums: the resumed epoch's train loss and accuracy are estimates");
                        // Older checkpoints hold rank 0's sums only: use them as this
                        // rank's estimate (every shard has the same number of samples).
                    }
                    [l, c, n, t, 0.0]
                }
            };
        } else {
            start_step = 0;
        }
        info!(checkpoint = %path.display(), epoch = start_epoch, step = start_step, "resumed");
    } else {
        sync::broadcast_from_root(&engine.variables(), comm)?;
    }

    Ok((start_epoch, start_step, partial))
}

/// Reports a finished background checkpoint to `observer`; a failure of the final one
/// (`final_name`) is kept in `final_error` (the run trained to its end but its final model
/// is not on disk).
fn deliver(done: Done, observer: &mut dyn Observer, final_name: &str, final_error: &mut Option<String>) {
    match done.written {
        Ok((json, state)) => {
            observer.checkpoint(&json, &state);
            if let Some(result) = &done.stored {
                observer.checkpoint_stored(&done.name, result);
            }
        }
        // A failed checkpoint (disk full, say) must not kill a healthy run: the previous
        // checkpoint is still intact because writes are atomic.
        Err(e) => {
            warn!(checkpoint = %done.name, error = %e, "checkpoint failed; training continues with the previous checkpoint kept");
            if done.name == final_name {
                *final_error = Some(e.to_string());
            }
        }
    }
}

/// Takes a checkpoint at (`epoch`, `step`) with this rank's partial-epoch sums `partial`
/// (loss·samples, correct, samples, seconds, all-reduce seconds); every rank calls it at
/// the same points. Rank 0 snapshots to host memory and hands the write to `writer`
/// (waiting for the previous checkpoint if that is still in flight, whose outcome it
/// returns).
#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    cfg: &TrainerConfig,
    engine: &mut Engine,
    comm: &mut dyn Collective,
    observer: &mut dyn Observer,
    writer: &mut BackgroundWriter,
    epoch: u32,
    step: u64,
    partial: [f64; 5],
) -> Result<Option<Done>, TrainError> {
    let Some(dir) = &cfg.checkpoint_dir else { return Ok(None) };
    // All ranks take part so the saved statistics are the same ones every rank continues with.
    sync::average_running_stats(&engine.buffers, comm)?;
    // Mid-epoch, every rank's own sums go into the checkpoint: rank 0's alone, used by every
    // rank after a restart, would misreport the resumed epoch's loss and accuracy.
    let rank_partials: Vec<[f64; 5]> = if step == 0 {
        Vec::new()
    } else {
        sync::gather_f64(&partial, comm)?
            .into_iter()
            .map(|v| std::array::from_fn(|k| v.get(k).copied().unwrap_or(0.0)))
            .collect()
    };
    if cfg.rank != 0 {
        return Ok(None);
    }
    let mut state = CheckpointState::new(&cfg.spec.model, epoch, step, cfg.spec.seed, cfg.world_size as u32);
    let total = |k: usize| rank_partials.iter().map(|r| r[k]).sum::<f64>();
    state.partial = [total(0), total(1), total(2), partial[3]];
    state.rank_partials = rank_partials;
    state.grad_scaler = engine.scaler.as_ref().map(GradScaler::state);
    state.loss_scale = state.grad_scaler.map_or(1.0, |s| s.scale);
    let snap = checkpoint::snapshot(&engine.variables(), &engine.sgd.momentum_buffers());
    let name = state.name();
    match writer.submit(dir, state, snap, observer.checkpoint_store()) {
        Ok(previous) => Ok(previous),
        // No thread for the writer: report it as this checkpoint's failure, like a full disk.
        Err(e) => Ok(Some(Done { name, written: Err(e), stored: None })),
    }
}
