//! The same model at any world size: with `--global-batch B --sync-bn`, N ranks of B/N
//! samples take the steps one rank of B samples takes (up to float32 summation order), on
//! the real trainer and the real TCP ring; without `--sync-bn` they do not, because each
//! rank's BatchNorm normalises over its own B/N samples. The same holds when the group
//! changes size mid-epoch (live state, as an elastic job) and when a checkpoint written by
//! N ranks is resumed on M.
//!
//! The bound. Two runs that compute the same steps in another float32 summation order
//! start apart by a few unit roundoffs per step and SGD then amplifies the difference (on
//! this random-label data by about 1.6× per step at lr 0.005: measured, see `NOISE_MARGIN`). So the
//! bound is not a constant but the distance between two runs that differ *only* in
//! summation order: one rank in libtorch's NCHW kernels against one rank in its
//! channels_last kernels (the same math, other accumulation orders). An N-rank run must
//! stay within `NOISE_MARGIN` times that distance; a run whose BatchNorm saw other
//! samples is orders of magnitude further away.

mod support;
mod tolerance;

use cvdist_common::cifar;
use cvdist_common::proto::JobSpec;
use cvdist_worker::collective::Solo;
use cvdist_worker::data::Datasets;
use cvdist_worker::train::live_state::{self, LiveSlot};
use cvdist_worker::train::{self, NoObserver, Observer, TrainOutcome, TrainerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::Comm;
use tch::{Device, Tensor};

const GLOBAL_BATCH: u32 = 128;
const STEPS: usize = 20;
const JOB: &str = "j0001-sync-bn";

/// How many times the summation-order distance an N-rank run may be from the 1-rank run.
/// Measured (Intel Xeon, AVX-512): with --sync-bn 2 and 4 ranks on the ring and 2 on gloo,
/// the 4 → 2 → 4 group and the resumed checkpoints land at 0.87–0.88× the NCHW/channels_last
/// distance (1.4e-3 after 20 steps at lr 0.005; 2 against 4 ranks: 1.0×; libtorch's own
/// BatchNorm against this one on 1 rank: 1.2×): any rounding-level difference grows to about
/// that size in 20 steps. Without SyncBatchNorm 4 ranks land at 21×.
const NOISE_MARGIN: f64 = 4.0;

/// libtorch's default generator is global to the process and training seeds it: tests
/// that train in one process must not interleave.
static TORCH_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn datasets() -> Datasets {
    Datasets {
        train: Arc::new(cifar::synthetic(GLOBAL_BATCH as usize * STEPS, 3)),
        test: Arc::new(cifar::synthetic(64, 4)),
    }
}

fn spec(sync_bn: bool) -> JobSpec {
    let mut s = cvdist_common::spec::default_spec("resnet20", 1);
    s.dataset = "synthetic".into();
    s.seed = 11;
    s.global_batch = GLOBAL_BATCH;
    s.sync_bn = sync_bn;
    // Small enough that 20 steps amplify rounding only to ~1e-3 (at 0.02 to ~4e-2, where
    // the summation-order distance hides what SyncBatchNorm changes).
    s.lr = 0.005;
    s.channels_last = true;
    s.checkpoint_every_steps = 8;
    s
}

fn config(spec: JobSpec, rank: usize, world: usize) -> TrainerConfig {
    TrainerConfig {
        spec,
        device: Device::Cpu,
        rank,
        world_size: world,
        checkpoint_dir: None,
        resume: None,
        progress_interval: Duration::from_secs(3600),
        freeze_bn: false,
    }
}

/// Trains the epoch on `world` ranks from `cfg(rank)`; rank 0's outcome (every rank's
/// weights are checked equal).
fn group(world: usize, data: &Datasets, cfg: impl Fn(usize) -> TrainerConfig + Sync) -> TrainOutcome {
    group_on(Comm::Ring, world, data, cfg)
}

fn group_on(kind: Comm, world: usize, data: &Datasets, cfg: impl Fn(usize) -> TrainerConfig + Sync) -> TrainOutcome {
    if world == 1 {
        return train::train(&cfg(0), data, &mut Solo::new(), &mut NoObserver).unwrap();
    }
    let mut outs = support::with_comm_scoped(kind, world, Duration::from_secs(60), |rank, mut comm| {
        train::train(&cfg(rank), data, comm.as_mut(), &mut NoObserver).unwrap()
    });
    for o in &outs[1..] {
        for ((_, a), (_, b)) in outs[0].variables.iter().zip(&o.variables) {
            assert!(a.equal(b), "ranks of one group diverged");
        }
    }
    outs.swap_remove(0)
}

fn run(world: usize, sync_bn: bool, data: &Datasets) -> TrainOutcome {
    group(world, data, |rank| config(spec(sync_bn), rank, world))
}

/// The floored relative L2 difference of all parameters and buffers taken as one vector
/// (per-tensor floors as `tolerance` defines them).
fn distance(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    let (mut diff_sq, mut norm_sq) = (0.0, 0.0);
    for ((name, x), (name_b, y)) in a.iter().zip(b) {
        assert_eq!(name, name_b);
        diff_sq += (x - y).norm().double_value(&[]).powi(2);
        norm_sq += x.norm().double_value(&[]).powi(2);
    }
    diff_sq.sqrt() / norm_sq.sqrt().max(1e-12)
}

/// The 1-rank run and the distance two summation orders of it end apart.
fn reference(data: &Datasets) -> (TrainOutcome, f64) {
    let one = run(1, true, data);
    let nchw = group(1, data, |_| config(JobSpec { channels_last: false, ..spec(true) }, 0, 1));
    let noise = distance(&one.variables, &nchw.variables);
    eprintln!("1 rank, channels_last vs NCHW (summation order only): {noise:e}");
    assert!(noise > 0.0, "the two layouts computed bit-identical runs: no summation-order scale");
    (one, noise)
}

#[test]
fn sync_bn_with_a_global_batch_trains_the_same_model_on_1_2_and_4_ranks() {
    let _one_at_a_time = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    let data = datasets();
    let (one, noise) = reference(&data);
    let mut worst_synced: f64 = 0.0;
    for (kind, world) in [(Comm::Ring, 2), (Comm::Ring, 4), (Comm::Gloo, 2)] {
        let many = group_on(kind, world, &data, |rank| config(spec(true), rank, world));
        let d = distance(&one.variables, &many.variables);
        eprintln!("--sync-bn, 1 vs {world} ranks ({kind:?}): {d:e} ({:.2}× the summation-order distance)", d / noise);
        assert!(
            d <= NOISE_MARGIN * noise,
            "{world} ranks ({kind:?}) with --sync-bn are {d:e} from 1 rank (noise {noise:e})"
        );
        worst_synced = worst_synced.max(d);
    }
    // What SyncBatchNorm buys: without it, each rank normalises over 32 samples.
    let d = distance(&one.variables, &run(4, false, &data).variables);
    eprintln!("without --sync-bn, 1 vs 4 ranks: {d:e} ({:.2}× the summation-order distance)", d / noise);
    assert!(d > NOISE_MARGIN * noise && d > 5.0 * worst_synced, "without --sync-bn 4 ranks are only {d:e} from 1 rank");
}

/// Records the batches and stops (as a lost or leaving member does) before step `stop_at`.
#[derive(Default)]
struct StopAt {
    last: Option<u64>,
    stop_at: Option<u64>,
}

impl Observer for StopAt {
    fn batch_indices(&mut self, _epoch: u32, step: u64, _indices: &[usize]) {
        self.last = Some(step);
    }

    fn should_stop(&mut self) -> Option<String> {
        let stop = self.stop_at?;
        (self.last == Some(stop - 1)).then(|| "leaving".to_string())
    }
}

/// One attempt of an elastic group: `slots` by rank (a member keeps its state there),
/// continuing from the live state of attempt `attempt - 1` when `attempt > 1`, stopping
/// before step `stop_at` (None: to the end). Rank 0's outcome when it ran to the end.
fn attempt(attempt: u32, slots: &[LiveSlot], stop_at: Option<u64>, data: &Datasets) -> Option<TrainOutcome> {
    let world = slots.len();
    let outs = support::with_comm_scoped(Comm::Ring, world, Duration::from_secs(60), |rank, mut comm| {
        let cfg = config(JobSpec { checkpoint_every_steps: 0, ..spec(true) }, rank, world);
        let start = (attempt > 1).then(|| {
            let mut own = live_state::take(&slots[rank], JOB, attempt - 1, attempt);
            let start = live_state::agree(&mut own, &cfg.spec, Device::Cpu, data.train.len(), u32::MAX, comm.as_mut());
            live_state::put_back(&slots[rank], own);
            start.unwrap().expect("a member held a live state")
        });
        let keep = Some((slots[rank].clone(), JOB.to_string(), attempt));
        let mut observer = StopAt { stop_at, ..StopAt::default() };
        train::train_from(&cfg, data, comm.as_mut(), &mut observer, start, keep).ok()
    });
    outs.into_iter().next().flatten()
}

/// A `2:4` job with a global batch of 128 starts on 4 workers, loses one mid-epoch (3 does
/// not divide 128, so it continues on 2: what the coordinator schedules), gains two back
/// and finishes on 4; every change continues from the members' live state at a step
/// boundary. It ends where one worker with batch 128 ends.
#[test]
fn an_elastic_group_that_shrinks_and_grows_mid_epoch_ends_where_one_rank_ends() {
    let _one_at_a_time = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    let data = datasets();
    let (one, noise) = reference(&data);
    let slots: Vec<LiveSlot> = (0..4).map(|_| LiveSlot::default()).collect();
    assert!(attempt(1, &slots, Some(6), &data).is_none(), "attempt 1 stops at step 6");
    // Workers 0 and 1 survive; the group of 2 continues from their state.
    assert!(attempt(2, &slots[..2], Some(13), &data).is_none(), "attempt 2 stops at step 13");
    // Two fresh workers join the members: 4 ranks to the end of the epoch.
    let fresh: Vec<LiveSlot> = vec![slots[0].clone(), slots[1].clone(), LiveSlot::default(), LiveSlot::default()];
    let end = attempt(3, &fresh, None, &data).expect("attempt 3 trains to the end");
    let d = distance(&one.variables, &end.variables);
    eprintln!("4 → 2 → 4 ranks mid-epoch with --sync-bn: {d:e} ({:.2}× the summation-order distance)", d / noise);
    assert!(d <= NOISE_MARGIN * noise, "the elastic run is {d:e} from 1 rank (noise {noise:e})");
}

/// The newest checkpoint record in `dir`.
fn newest_checkpoint(dir: &Path) -> PathBuf {
    let mut records: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains("-s0")))
        .collect();
    records.sort();
    records.pop().expect("a mid-epoch checkpoint")
}

/// A checkpoint written mid-epoch by 2 ranks resumes on 4 and on 1 at the same step: the
/// resumed runs train the rest of the epoch's global steps once and end where the
/// uninterrupted 1-rank run ends.
#[test]
fn a_mid_epoch_checkpoint_of_2_ranks_resumes_on_4_and_on_1_at_the_same_step() {
    let _one_at_a_time = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    let data = datasets();
    let (one, noise) = reference(&data);
    let dir = tempfile::tempdir().unwrap();
    // 2 ranks write checkpoints at steps 8 and 16; the run is then thrown away except them.
    let ckpt_dir = dir.path().to_path_buf();
    group(2, &data, |rank| TrainerConfig { checkpoint_dir: Some(ckpt_dir.clone()), ..config(spec(true), rank, 2) });
    let step8 = dir.path().join(format!("{}.json", cvdist_common::names::checkpoint_name(0, 8)));
    assert!(step8.exists(), "no step-8 checkpoint; the newest is {:?}", newest_checkpoint(dir.path()));
    for world in [4, 1] {
        let mut audits = support::with_comm_scoped_or_solo(world, |rank, comm| {
            let cfg = TrainerConfig { resume: Some(step8.clone()), ..config(spec(true), rank, world) };
            let mut steps = Steps::default();
            let out = train::train(&cfg, &data, comm, &mut steps).unwrap();
            (out, steps.0)
        });
        let (out, steps) = audits.swap_remove(0);
        assert_eq!(steps, (8..STEPS as u64).collect::<Vec<_>>(), "resumed on {world} ranks at step 8, each step once");
        let d = distance(&one.variables, &out.variables);
        eprintln!("2-rank checkpoint resumed on {world}: {d:e} ({:.2}× the summation-order distance)", d / noise);
        assert!(d <= NOISE_MARGIN * noise, "resumed on {world} ranks: {d:e} from 1 rank (noise {noise:e})");
    }
}

/// The step numbers trained.
#[derive(Default)]
struct Steps(Vec<u64>);

impl Observer for Steps {
    fn batch_indices(&mut self, _epoch: u32, step: u64, _indices: &[usize]) {
        self.0.push(step);
    }
}
