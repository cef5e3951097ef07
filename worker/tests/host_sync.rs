//! Device-side sums and lazy divergence checks, which keep a step from waiting for the
//! device, through the real trainer (real libtorch, real TCP ring, real checkpoint files):
//! loss and accuracy are summed on the device and read back only where needed, and
//! divergence is recorded on the device and checked lazily — with the same epoch totals,
//! bit for bit, as per-step host arithmetic, the same progress lines, and every rank
//! stopping at the same step with the error naming the step that diverged first.

mod support;
mod trainer_config;

use cvdist_common::cifar;
use cvdist_common::proto::{EpochMetrics, JobSpec, Progress};
use cvdist_common::sampler;
use cvdist_worker::collective::{Collective, Solo};
use cvdist_worker::data::{Datasets, Loader};
use cvdist_worker::train::divergence::CHECK_EVERY_STEPS;
use cvdist_worker::train::schedule::learning_rate;
use cvdist_worker::train::sync::GradSync;
use cvdist_worker::train::{self, checkpoint, Engine, Observer, TrainError, TrainerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::{Comm, COMMS};
use tch::Device;

fn spec(batch: u32) -> JobSpec {
    let mut s = cvdist_common::spec::default_spec("resnet20", 1);
    s.dataset = "synthetic".into();
    s.batch_size = batch;
    s.seed = 21;
    s
}

fn config(spec: JobSpec, rank: usize, world: usize, progress: Duration, ckpt: Option<PathBuf>) -> TrainerConfig {
    TrainerConfig { checkpoint_dir: ckpt, progress_interval: progress, ..trainer_config::cpu(spec, rank, world) }
}

/// Collects progress lines, the last step trained, and poisons one step's loss.
#[derive(Default)]
struct Watch {
    progress: Vec<Progress>,
    last_step: Option<u64>,
    poison: Option<(u32, u64)>,
}

impl Observer for Watch {
    fn progress(&mut self, p: &Progress) {
        self.progress.push(*p);
    }
    fn batch_indices(&mut self, _epoch: u32, step: u64, _indices: &[usize]) {
        self.last_step = Some(step);
    }
    fn poison_loss(&mut self, epoch: u32, step: u64) -> bool {
        self.poison == Some((epoch, step))
    }
}

fn solo_run(spec: &JobSpec, data: &Datasets, progress: Duration) -> (EpochMetrics, Vec<Progress>) {
    let mut watch = Watch::default();
    let out = train::train(&config(spec.clone(), 0, 1, progress, None), data, &mut Solo::new(), &mut watch).unwrap();
    assert_eq!(out.history.len(), 1);
    (out.history[0], watch.progress)
}

/// The trainer's epoch loss and accuracy, summed on the device and read once, equal the
/// old host arithmetic (`loss_sum += loss as f64 * n`, per step) over the same steps, bit
/// for bit: the same steps are replayed through the real engine and summed on the host.
/// With a progress line every step (a read every step) the totals are the same again, and
/// the lines are all there, in order, the last one equal to the epoch's figures.
#[test]
fn device_summed_epoch_totals_equal_the_host_arithmetic_bit_for_bit() {
    tch::set_num_threads(1);
    // 100 samples in batches of 16: six full batches and a last one of 4.
    let data = Datasets { train: Arc::new(cifar::synthetic(100, 3)), test: Arc::new(cifar::synthetic(30, 4)) };
    let spec = spec(16);
    let steps = 7u64;

    // The trainer, reading the sums only at the last step (progress interval 1 h).
    let (lazy, lazy_progress) = solo_run(&spec, &data, Duration::from_secs(3600));
    assert_eq!(lazy_progress.len(), 1, "only the last step reports within an hour");

    // The same steps replayed, each read back and summed on the host: the reference.
    let mut engine = Engine::new(&spec, Device::Cpu).unwrap();
    let mut sync = GradSync::new();
    let mut solo = Solo::new();
    let order = sampler::rank_indices(data.train.len(), 1, 0, spec.seed, 0);
    let loader = Loader::new(data.train.clone(), order, spec.batch_size as usize, spec.seed, 0, spec.augment, 0);
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0.0f64);
    for (step, batch) in loader.enumerate() {
        let lr = learning_rate(spec.lr, 0, 1, step as u64, steps, 1.0, 0);
        let out = engine.forward_backward(&batch.images, &batch.labels);
        engine.finish_step(&mut sync, &mut solo as &mut dyn Collective, &out.loss, lr, (0, step as u64)).unwrap();
        let n = batch.labels.size()[0] as f64;
        loss_sum += out.loss.double_value(&[]) * n;
        correct += out.correct.double_value(&[]);
        seen += n;
    }
    assert_eq!(seen, 100.0);
    assert_eq!(lazy.train_loss.to_bits(), (loss_sum / seen).to_bits(), "{} vs {}", lazy.train_loss, loss_sum / seen);
    assert_eq!(lazy.train_acc.to_bits(), (correct / seen).to_bits(), "{} vs {}", lazy.train_acc, correct / seen);

    // A progress line every step: one read per step, the same totals.
    let (eager, lines) = solo_run(&spec, &data, Duration::ZERO);
    assert_eq!(eager.train_loss.to_bits(), lazy.train_loss.to_bits());
    assert_eq!(eager.train_acc.to_bits(), lazy.train_acc.to_bits());
    assert_eq!(eager.test_loss.to_bits(), lazy.test_loss.to_bits());
    assert_eq!(lines.iter().map(|p| p.step).collect::<Vec<_>>(), (1..=steps).collect::<Vec<_>>());
    for p in &lines {
        assert_eq!((p.epoch, p.steps_per_epoch), (0, steps));
        assert!(p.loss.is_finite() && p.loss > 0.0, "{p:?}");
        assert!((0.0..=1.0).contains(&p.acc), "{p:?}");
        assert!(p.step_seconds > 0.0 && p.step_seconds.is_finite(), "{p:?}");
        assert!(p.images_per_sec > 0.0, "{p:?}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last.loss.to_bits(), eager.train_loss.to_bits());
    assert_eq!(last.acc.to_bits(), eager.train_acc.to_bits());
}

struct RankEnd {
    result: Result<train::TrainOutcome, TrainError>,
    last_step: Option<u64>,
}

/// Two ranks on the real loopback ring (or the gloo group agreed over it), one epoch, rank
/// `poison.0` poisoned at step `poison.1` of epoch 0.
fn two_ranks(kind: Comm, spec: &JobSpec, data: &Datasets, poison: (usize, u64), ckpt: Option<&Path>) -> Vec<RankEnd> {
    support::with_comm_scoped(kind, 2, Duration::from_secs(60), |rank, mut comm| {
        let cfg = config(spec.clone(), rank, 2, Duration::from_secs(3600), ckpt.map(Path::to_path_buf));
        let mut watch = Watch { poison: (rank == poison.0).then_some((0, poison.1)), ..Watch::default() };
        let result = train::train(&cfg, data, comm.as_mut(), &mut watch);
        RankEnd { result, last_step: watch.last_step }
    })
}

fn diverged_at(ends: &[RankEnd], step: u64) -> String {
    let errors: Vec<String> = ends
        .iter()
        .map(|end| match &end.result {
            Err(e @ TrainError::Diverged { epoch: 0, step: s, .. }) if *s == step => e.to_string(),
            Err(e) => panic!("expected a divergence at epoch 0 step {step}, got: {e}"),
            Ok(_) => panic!("a rank trained to the end past a NaN loss"),
        })
        .collect();
    assert_eq!(errors[0], errors[1], "every rank fails with the same error");
    errors[0].clone()
}

/// 40 steps per rank per epoch (2 ranks × batch 8 × 40 = 640 samples).
fn forty_steps() -> (JobSpec, Datasets) {
    let data = Datasets { train: Arc::new(cifar::synthetic(640, 5)), test: Arc::new(cifar::synthetic(20, 6)) };
    (spec(8), data)
}

/// A NaN loss on rank 1 at step 5 is found at the first check point (after step 31, the
/// 32nd step): both ranks trained the same steps, stop there, and name step 5. On the ring
/// and on gloo.
#[test]
fn divergence_is_checked_lazily_and_names_the_first_diverged_step_on_every_rank() {
    assert_eq!(CHECK_EVERY_STEPS, 32, "the step numbers below assume checks every 32 steps");
    for kind in COMMS {
        lazily_on(kind);
    }
}

fn lazily_on(kind: Comm) {
    let (spec, data) = forty_steps();
    let ends = two_ranks(kind, &spec, &data, (1, 5), None);
    assert_eq!(diverged_at(&ends, 5), "training diverged at epoch 0 step 5: loss is NaN");
    for end in &ends {
        assert_eq!(end.last_step, Some(31), "every rank stops at the same check point");
    }

    // Past the last check point of the epoch: found at the epoch's last step.
    let ends = two_ranks(kind, &spec, &data, (0, 35), None);
    assert_eq!(diverged_at(&ends, 35), "training diverged at epoch 0 step 35: loss is NaN");
    for end in &ends {
        assert_eq!(end.last_step, Some(39));
    }
}

/// A checkpoint is a check point too: a divergence at step 12 stops both ranks before the
/// step-20 checkpoint, so no checkpoint of the diverged weights is written. On the ring and
/// on gloo.
#[test]
fn divergence_is_checked_before_every_checkpoint() {
    for kind in COMMS {
        before_checkpoints_on(kind);
    }
}

fn before_checkpoints_on(kind: Comm) {
    let (mut spec, data) = forty_steps();
    spec.checkpoint_every_steps = 10;
    let dir = tempfile::tempdir().unwrap();
    let ends = two_ranks(kind, &spec, &data, (1, 12), Some(dir.path()));
    assert_eq!(diverged_at(&ends, 12), "training diverged at epoch 0 step 12: loss is NaN");
    for end in &ends {
        assert_eq!(end.last_step, Some(19));
    }
    let clean = dir.path().join(format!("{}.json", checkpoint::name_for(0, 10)));
    let diverged = dir.path().join(format!("{}.json", checkpoint::name_for(0, 20)));
    assert!(clean.exists(), "the step-10 checkpoint (before the divergence) is kept: {}", clean.display());
    assert!(!diverged.exists(), "no checkpoint after the divergence");
}
