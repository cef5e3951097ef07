//! The training loop of one rank. With a world size of 1 it is the bare single-worker
//! trainer; with more, gradients are averaged through a [`Collective`] every step, so N
//! ranks with batch b see the samples and average the gradients one rank with batch N·b
//! would. BatchNorm in training mode still normalises over each rank's own batch, so the
//! steps are only the same with `freeze_bn` (docs/ARCHITECTURE.md, "N workers × batch b").

use super::checkpoint::{self, CheckpointState};
use super::ckpt_writer::{BackgroundWriter, Done};
use super::divergence::CHECK_EVERY_STEPS;
use super::engine::Engine;
use super::error::TrainError;
use super::exact_gather;
use super::live_state::{Keeper, LiveSlot, LiveStart};
use super::metrics::DeviceSums;
use super::observer::Observer;
use super::overlap::{self, Lane};
use super::position::Position;
use super::scaler::{GradScaler, ScalerState};
use super::schedule::learning_rate;
use super::sync::{self, GradSync};
use crate::collective::Collective;
use crate::data::loader::Loader;
use cvdist_common::epoch_sums::EpochSums;
use cvdist_common::proto::{EpochMetrics, JobSpec, Progress};
use cvdist_common::sampler;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};
use tracing::{info, info_span, warn};

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
    let mut kept = Keeper::new(engine, keep, start_at, partial)?;
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
        let EpochSums {
            loss_sum,
            correct,
            samples: mut seen,
            seconds: prior_seconds,
            allreduce_seconds: mut wire_seconds,
        } = if epoch == start_epoch { partial } else { EpochSums::default() };
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
            let mut out = kept.engine_mut().forward_backward(&batch.images, &batch.labels);
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
                kept.finish_step(&mut grad_sync, comm, &out.loss, lr, (epoch, step), after, &sums, seen)?;
            wire_seconds += wire;
            step += 1;
            steps_since_report += 1;
            let elapsed = prior_seconds + epoch_start.elapsed().as_secs_f64();
            let confirm = if kept.keeps() { comm.completion() } else { None };
            let host =
                EpochSums { samples: seen, seconds: elapsed, allreduce_seconds: wire_seconds, ..EpochSums::default() };
            kept.commit(after, &sums, host, confirm);
            let every = spec.checkpoint_every_steps as u64;
            // Not in a re-sharded remainder of an epoch: a checkpoint's position is a step
            // of the epoch's own shards (a resume from it restarts such an epoch instead).
            let checkpoint_due = every > 0 && step % every == 0 && step < steps_per_epoch && at.base == 0;
            if step % CHECK_EVERY_STEPS == 0 || step == steps_per_epoch || checkpoint_due {
                kept.engine_mut().check_divergence()?;
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
                let acc = EpochSums {
                    loss_sum,
                    correct,
                    samples: seen,
                    seconds: prior_seconds + epoch_start.elapsed().as_secs_f64(),
                    allreduce_seconds: wire_seconds,
                };
                if let Some(done) =
                    write_checkpoint(cfg, kept.engine_mut(), comm, observer, &mut writer, epoch, step, acc)?
                {
                    deliver(done, observer, &final_name, &mut final_checkpoint_error);
                }
                // The checkpoint averaged the statistics once more (a no-op up to rounding).
                kept.refresh_statistics();
            }
        }
        // Normally done at the last step already; reads nothing when it was.
        kept.engine_mut().check_divergence()?;
        let (loss_sum, correct) = sums.read()?;
        let train_seconds = prior_seconds + epoch_start.elapsed().as_secs_f64();

        sync::average_running_stats(&kept.engine().buffers, comm)?;
        let eval_range = sampler::eval_indices(data.test.len(), cfg.world_size, cfg.rank);
        let (test_loss_sum, test_correct, test_seen) =
            kept.engine().evaluate(&data.test, eval_range.collect(), observer)?;
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
        if let Some(done) =
            write_checkpoint(cfg, kept.engine_mut(), comm, observer, &mut writer, epoch + 1, 0, EpochSums::default())?
        {
            deliver(done, observer, &final_name, &mut final_checkpoint_error);
        }
        let confirm = if kept.keeps() { comm.completion() } else { None };
        kept.commit(
            Position::epoch_start(epoch + 1, world),
            &DeviceSums::new(cfg.device, 0.0, 0.0)?,
            EpochSums::default(),
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
    kept.release();
    let variables =
        kept.engine().variables().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))).collect();
    Ok(TrainOutcome { history, wall_seconds: started.elapsed().as_secs_f64(), final_checkpoint_error, variables })
}

/// Restores `engine` from `cfg.resume`'s checkpoint, or gives every rank rank 0's initial
/// weights. Returns the epoch and step to start at and this rank's sums of the partially
/// trained epoch.
fn start_engine(
    cfg: &TrainerConfig,
    engine: &mut Engine,
    comm: &mut dyn Collective,
) -> Result<(u32, u64, EpochSums), TrainError> {
    let (mut start_epoch, mut start_step, mut partial) = (0u32, 0u64, EpochSums::default());
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
                    if cfg.world_size > 1 && ckpt.state.step > 0 {
                        warn!("checkpoint predates per-rank sums: the resumed epoch's train loss and accuracy are estimates");
                        // Older checkpoints hold rank 0's sums only: use them as this
                        // rank's estimate (every shard has the same number of samples).
                    }
                    ckpt.state.partial
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

/// Takes a checkpoint at (`epoch`, `step`) with this rank's partial-epoch sums `partial`;
/// every rank calls it at
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
    partial: EpochSums,
) -> Result<Option<Done>, TrainError> {
    let Some(dir) = &cfg.checkpoint_dir else { return Ok(None) };
    // All ranks take part so the saved statistics are the same ones every rank continues with.
    sync::average_running_stats(&engine.buffers, comm)?;
    // Mid-epoch, every rank's own sums go into the checkpoint: rank 0's alone, used by every
    // rank after a restart, would misreport the resumed epoch's loss and accuracy.
    let rank_partials: Vec<EpochSums> = if step == 0 {
        Vec::new()
    } else {
        exact_gather::gather_f64(&partial.to_array(), comm)?
            .into_iter()
            .map(|v| EpochSums::from_array(std::array::from_fn(|k| v.get(k).copied().unwrap_or(0.0))))
            .collect()
    };
    if cfg.rank != 0 {
        return Ok(None);
    }
    let mut state = CheckpointState::new(&cfg.spec.model, epoch, step, cfg.spec.seed, cfg.world_size as u32);
    state.partial = EpochSums { allreduce_seconds: 0.0, ..EpochSums::total(&rank_partials, &partial) };
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
