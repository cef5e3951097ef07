//! The engine: one model's step (forward, backward, gradient all-reduce, update),
//! evaluation and the state a step changes (weights, momentum, BatchNorm buffers, loss
//! scaler). The epoch loop around it is `super::trainer`; keeping a step's state for live
//! recovery is `super::live_state`.

use super::buckets::Buckets;
use super::divergence::{DivergenceRecord, FirstDivergence};
use super::error::TrainError;
use super::metrics::{DeviceSums, StepOutput};
use super::observer::Observer;
use super::overlap::{self, GradHooks, Lane, FIRST_BUCKET_ELEMS};
use super::precision::{self, Precision};
use super::scaler::GradScaler;
use super::sgd::Sgd;
use super::sync::{GradSync, Reduced};
use crate::collective::Collective;
use crate::data::loader::Loader;
use crate::models;
use cvdist_common::cifar::CifarSplit;
use cvdist_common::proto::JobSpec;
use std::sync::Arc;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use tracing::warn;

/// Images per evaluation batch (the reference recipe's test loader uses 100).
const EVAL_BATCH: usize = 100;

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
        let asked = cvdist_common::spec::precision(spec);
        let precision = precision::effective(asked, device);
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
    pub fn evaluate(
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
