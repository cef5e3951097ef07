//! The training loop of one rank. With a world size of 1 it is the bare single-worker
//! trainer; with more, gradients are averaged through a [`Collective`] every step, so N
//! ranks with batch b see the samples and average the gradients one rank with batch N·b
//! would. BatchNorm in training mode still normalises over each rank's own batch, so the
//! steps are only the same with `freeze_bn` (docs/ARCHITECTURE.md, "N workers × batch b").

use super::buckets;
use super::checkpoint;
use super::checkpointing::{deliver, write_checkpoint};
use super::ckpt_writer::BackgroundWriter;
use super::divergence::CHECK_EVERY_STEPS;
use super::engine::Engine;
use super::error::TrainError;
use super::live_state::{Keeper, LiveSlot, LiveStart};
use super::metrics::DeviceSums;
use super::observer::Observer;
use super::overlap::{self, Lane};
use super::position::{Batch, Position};
use super::resume;
use super::schedule::learning_rate;
use super::sync::{self, GradSync};
use super::sync_bn;
use crate::collective::Collective;
use crate::data::loader::Loader;
use cvdist_common::epoch_sums::EpochSums;
use cvdist_common::proto::{EpochMetrics, JobSpec, Progress};
use cvdist_common::sampler;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};
use tracing::{info, info_span};

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
    let batch = Batch::of(spec);
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
    let grad_sync = match lane {
        Some(lane) => {
            buckets::check_same_layout(engine.sgd.buckets(), comm)?;
            engine.overlapped_sync(lane)?
        }
        None => GradSync::new(),
    };
    let (start_at, partial) = match live_at {
        Some(at) => at,
        None => {
            let (epoch, step, partial) = resume::start_engine(cfg, &mut engine, comm)?;
            (Position { steps: step, ..Position::epoch_start(epoch, world) }, partial)
        }
    };
    let mut run = Run {
        cfg,
        data,
        comm,
        observer,
        kept: Keeper::new(engine, keep, start_at, partial)?,
        grad_sync,
        writer: BackgroundWriter::default(),
        final_name: checkpoint::name_for(spec.epochs, 0),
        final_checkpoint_error: None,
        scale: if spec.scale_lr { cfg.world_size as f64 } else { 1.0 },
    };
    let mut history = Vec::new();
    for epoch in start_at.epoch..spec.epochs {
        let span = info_span!("epoch", epoch, rank = cfg.rank);
        let _enter = span.enter();
        let first = epoch == start_at.epoch;
        // The epoch's samples: its DistributedSampler shard, or after a world-size change
        // mid-epoch the rest of its order re-sharded (`position`).
        let (at, partial) =
            if first { (start_at, partial) } else { (Position::epoch_start(epoch, world), EpochSums::default()) };
        let trained = run.train_epoch(at, partial, report_first && first)?;
        let metrics = run.end_epoch(epoch, trained)?;
        history.push(metrics);
    }
    // The run is only over once its last checkpoint is written and stored (or known not
    // to be): the final-checkpoint rule reads the outcome.
    if let Some(done) = run.writer.wait() {
        deliver(done, run.observer, &run.final_name, &mut run.final_checkpoint_error);
    }
    run.kept.release();
    let variables =
        run.kept.engine().variables().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))).collect();
    Ok(TrainOutcome {
        history,
        wall_seconds: started.elapsed().as_secs_f64(),
        final_checkpoint_error: run.final_checkpoint_error,
        variables,
    })
}

/// One rank's run in progress: what the epochs share.
struct Run<'a> {
    cfg: &'a TrainerConfig,
    data: &'a Datasets,
    comm: &'a mut dyn Collective,
    observer: &'a mut dyn Observer,
    /// The engine, committed after every complete step.
    kept: Keeper,
    grad_sync: GradSync,
    writer: BackgroundWriter,
    /// The name of the checkpoint after the last epoch, and why it could not be written
    /// if it could not.
    final_name: String,
    final_checkpoint_error: Option<String>,
    /// The learning-rate multiplier: the world size with `--scale-lr`, else 1.
    scale: f64,
}

/// This rank's epoch sums now: the device sums read back (waits for the queued steps) with
/// the samples, seconds and all-reduce seconds the loop counted on the host.
fn read_sums(sums: &DeviceSums, samples: f64, seconds: f64, allreduce_seconds: f64) -> Result<EpochSums, TrainError> {
    let (loss_sum, correct) = sums.read()?;
    Ok(EpochSums { loss_sum, correct, samples, seconds, allreduce_seconds })
}

/// What an epoch's training left for its end.
struct Trained {
    /// This rank's sums over the epoch's steps; `seconds` is its training time, including
    /// what earlier attempts trained of it (`prior_seconds`).
    sums: EpochSums,
    prior_seconds: f64,
    /// The learning rate of the last step.
    lr: f64,
    steps_per_epoch: u64,
    /// When this attempt's part of the epoch began.
    began: Instant,
}

impl Run<'_> {
    /// The training steps of the epoch at `at`, continuing this rank's sums `partial`;
    /// `report_first`: report progress after the first step (a live recovery's end).
    fn train_epoch(&mut self, at: Position, partial: EpochSums, report_first: bool) -> Result<Trained, TrainError> {
        let cfg = self.cfg;
        let spec = &cfg.spec;
        let batch = Batch::of(spec);
        let epoch = at.epoch;
        let began = Instant::now();
        let segment = at.segment(self.data.train.len(), cfg.rank, spec.seed, batch);
        let steps_per_epoch = segment.steps_per_epoch;
        let skip = at.step(batch);
        let EpochSums {
            loss_sum,
            correct,
            samples: mut seen,
            seconds: prior_seconds,
            allreduce_seconds: mut wire_seconds,
        } = partial;
        // Σ loss·samples and Σ correct stay on the device and are read back only where
        // a value is needed (progress line, checkpoint, epoch end); `seen` is known here.
        let mut sums = DeviceSums::new(cfg.device, loss_sum, correct)?;
        let mut last_report = match Instant::now().checked_sub(cfg.progress_interval) {
            Some(past) if report_first => past,
            _ => Instant::now(),
        };
        let mut steps_since_report = 0u32;
        let loader = Loader::for_device(
            cfg.device,
            self.data.train.clone(),
            segment.indices,
            batch.per_rank(at.world),
            spec.seed,
            epoch as u64,
            spec.augment,
            at.steps as usize,
        );
        let scale = self.scale;
        let schedule =
            |step| learning_rate(spec.lr, epoch, spec.epochs, step, steps_per_epoch, scale, spec.warmup_epochs);
        let mut step = skip;
        let mut lr = schedule(step);
        for batch in loader {
            if let Some(reason) = self.observer.should_stop() {
                return Err(TrainError::Stopped(reason));
            }
            self.observer.batch_indices(epoch, step, &batch.indices);
            if let Some(done) = self.writer.poll() {
                deliver(done, self.observer, &self.final_name, &mut self.final_checkpoint_error);
            }
            lr = schedule(step);
            let engine = self.kept.engine_mut();
            let mut out = if spec.sync_bn {
                sync_bn::with_group(self.comm, || engine.forward_backward(&batch.images, &batch.labels))?
            } else {
                engine.forward_backward(&batch.images, &batch.labels)
            };
            if self.observer.poison_loss(epoch, step) {
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
            let (wire, _applied) = self.kept.finish_step(
                &mut self.grad_sync,
                self.comm,
                &out.loss,
                lr,
                (epoch, step),
                after,
                &sums,
                seen,
            )?;
            wire_seconds += wire;
            step += 1;
            steps_since_report += 1;
            let elapsed = prior_seconds + began.elapsed().as_secs_f64();
            let confirm = if self.kept.keeps() { self.comm.completion() } else { None };
            let host =
                EpochSums { samples: seen, seconds: elapsed, allreduce_seconds: wire_seconds, ..EpochSums::default() };
            self.kept.commit(after, &sums, host, confirm);
            let every = spec.checkpoint_every_steps as u64;
            // Not in a re-sharded remainder of an epoch: a checkpoint's position is a step
            // of the epoch's own shards (a resume from it restarts such an epoch instead).
            let checkpoint_due = every > 0 && step.is_multiple_of(every) && step < steps_per_epoch && at.base == 0;
            if step.is_multiple_of(CHECK_EVERY_STEPS) || step == steps_per_epoch || checkpoint_due {
                self.kept.engine_mut().check_divergence()?;
            }
            if cfg.rank == 0 && (last_report.elapsed() >= cfg.progress_interval || step == steps_per_epoch) {
                // The one read of a progress interval: it waits for the queued steps, so
                // the time since the last report, over its steps, is the step time.
                let (loss_sum, correct) = sums.read()?;
                let step_seconds = last_report.elapsed().as_secs_f64() / f64::from(steps_since_report.max(1));
                last_report = Instant::now();
                steps_since_report = 0;
                let elapsed = prior_seconds + began.elapsed().as_secs_f64();
                self.observer.progress(&Progress {
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
                let acc = read_sums(&sums, seen, prior_seconds + began.elapsed().as_secs_f64(), wire_seconds)?;
                self.checkpoint(epoch, step, acc)?;
                // The checkpoint averaged the statistics once more (a no-op up to rounding).
                self.kept.refresh_statistics();
            }
        }
        // Normally done at the last step already; reads nothing when it was.
        self.kept.engine_mut().check_divergence()?;
        let sums = read_sums(&sums, seen, prior_seconds + began.elapsed().as_secs_f64(), wire_seconds)?;
        Ok(Trained { sums, prior_seconds, lr, steps_per_epoch, began })
    }

    /// The end of epoch `epoch`: the group's statistics and evaluation, the epoch's metrics
    /// summed over the ranks, the divergence guard, the epoch-end checkpoint and commit,
    /// and the report.
    fn end_epoch(&mut self, epoch: u32, trained: Trained) -> Result<EpochMetrics, TrainError> {
        let cfg = self.cfg;
        let world = cfg.world_size as u32;
        let Trained { sums, prior_seconds, lr, steps_per_epoch, began } = trained;
        sync::average_running_stats(&self.kept.engine().buffers, self.comm)?;
        let eval_range = sampler::eval_indices(self.data.test.len(), cfg.world_size, cfg.rank);
        let (test_loss_sum, test_correct, test_seen) =
            self.kept.engine().evaluate(&self.data.test, eval_range.collect(), self.observer)?;
        if let Some(reason) = self.observer.should_stop() {
            return Err(TrainError::Stopped(reason));
        }
        let mut totals = [sums.loss_sum, sums.correct, sums.samples, test_loss_sum, test_correct, test_seen];
        sync::sum_metrics(&mut totals, self.comm)?;
        let [loss_sum, correct, seen, test_loss_sum, test_correct, test_seen] = totals;
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen.max(1.0),
            train_acc: correct / seen.max(1.0),
            test_loss: test_loss_sum / test_seen.max(1.0),
            test_acc: test_correct / test_seen.max(1.0),
            lr,
            seconds: prior_seconds + began.elapsed().as_secs_f64(),
            images_per_sec: seen / sums.seconds.max(1e-9),
            world_size: cfg.world_size as u32,
            allreduce_seconds: sums.allreduce_seconds,
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
            self.observer.epoch(&metrics);
            return Err(TrainError::Diverged { epoch, step: steps_per_epoch, what, loss });
        }
        self.checkpoint(epoch + 1, 0, EpochSums::default())?;
        let confirm = if self.kept.keeps() { self.comm.completion() } else { None };
        self.kept.commit(
            Position::epoch_start(epoch + 1, world),
            &DeviceSums::new(cfg.device, 0.0, 0.0)?,
            EpochSums::default(),
            confirm,
        );
        self.observer.epoch(&metrics);
        Ok(metrics)
    }

    /// A checkpoint at (`epoch`, `step`) with this rank's partial-epoch sums `partial`
    /// (every rank takes part); reports the previous one if it finished meanwhile.
    fn checkpoint(&mut self, epoch: u32, step: u64, partial: EpochSums) -> Result<(), TrainError> {
        let done = write_checkpoint(
            self.cfg,
            self.kept.engine_mut(),
            self.comm,
            self.observer,
            &mut self.writer,
            epoch,
            step,
            partial,
        )?;
        if let Some(done) = done {
            deliver(done, self.observer, &self.final_name, &mut self.final_checkpoint_error);
        }
        Ok(())
    }
}
