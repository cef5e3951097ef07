//! A group that loses a member mid-epoch continues from a survivor's in-memory state,
//! through the real trainer, the real loopback TCP ring and real libtorch.
//! (1) A replacement at the same world size ends bit-identical to an uninterrupted run,
//! weights and epoch metrics alike; (2) survivors that completed different steps continue
//! from the furthest; (3) at a smaller world size the rest of the epoch trains every sample
//! exactly once (the batch-index audit of `equivalence.rs`). Each runs on the ring and on a
//! c10d gloo group.

mod support;
mod trainer_config;

use cvdist_common::cifar;
use cvdist_common::proto::{EpochMetrics, JobSpec};
use cvdist_common::sampler;
use cvdist_worker::collective::{Collective, CollectiveError, Completion, CompletionState, GradCompression, Solo};
use cvdist_worker::data::Datasets;
use cvdist_worker::train::live_state::{self, LiveSlot};
use cvdist_worker::train::position::Position;
use cvdist_worker::train::{self, Engine, Observer, TrainError, TrainOutcome};
use std::sync::Arc;
use std::time::Duration;
use support::{Comm, COMMS};
use tch::{Device, Tensor};

const LEN: usize = 384;
const JOB: &str = "j0001-live";

fn datasets() -> Datasets {
    Datasets { train: Arc::new(cifar::synthetic(LEN, 3)), test: Arc::new(cifar::synthetic(50, 4)) }
}

fn spec() -> JobSpec {
    let mut s = cvdist_common::spec::default_spec("resnet20", 2);
    s.batch_size = 16;
    s.dataset = "synthetic".into();
    s.seed = 5;
    s.lr = 0.05;
    s
}

/// Records every batch (epoch, step, indices), and stops training (as a killed rank would
/// stop taking part) before step `stop_at` of its epoch.
#[derive(Default)]
struct Audit {
    batches: Vec<(u32, u64, Vec<usize>)>,
    stop_at: Option<(u32, u64)>,
}

impl Observer for Audit {
    fn batch_indices(&mut self, epoch: u32, step: u64, indices: &[usize]) {
        self.batches.push((epoch, step, indices.to_vec()));
    }

    fn should_stop(&mut self) -> Option<String> {
        let (epoch, step) = self.stop_at?;
        let last = self.batches.last().map(|(e, s, _)| (*e, *s));
        (step > 0 && last == Some((epoch, step - 1))).then(|| "killed".to_string())
    }
}

/// One member of a group: the slot it keeps its state in, where it stops (if it does),
/// and whether it starts by agreeing on a live state of attempt `attempt - 1`.
struct Member {
    slot: LiveSlot,
    stop_at: Option<(u32, u64)>,
    live: bool,
    /// Abort this rank's group at the BatchNorm all-reduce of this step (of the first
    /// epoch), after the step's gradient all-reduce completed.
    abort_bn_at: Option<u64>,
    /// From this commit on, report the step's collectives as `CompletionState` on the
    /// device.
    device_state_from: Option<(u64, CompletionState)>,
}

fn member(slot: &LiveSlot) -> Member {
    Member { slot: slot.clone(), stop_at: None, live: false, abort_bn_at: None, device_state_from: None }
}

/// A rank's real communicator that aborts itself (the group's own abort, as a dead peer's
/// detection or a job's stop does) when the trainer issues the BatchNorm average of step
/// `at`: the step's exact device all-reduce, the only one a step issues, after its
/// gradient buckets.
struct AbortAtBatchNorm {
    inner: Box<dyn Collective>,
    at: Option<u64>,
    exact_calls: u64,
    /// See [`Member::device_state_from`]; `commits` counts the trainer's asks.
    device_state: Option<(u64, CompletionState)>,
    commits: u64,
}

impl Collective for AbortAtBatchNorm {
    support::delegate_required_collective!(inner);
    fn set_grad_compression(&mut self, c: GradCompression) -> Result<(), CollectiveError> {
        self.inner.set_grad_compression(c)
    }
    fn grad_compression(&self) -> GradCompression {
        self.inner.grad_compression()
    }
    fn all_reduce_sum_grads(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.inner.all_reduce_sum_grads(buf)
    }
    fn wait(&mut self) -> Result<(), CollectiveError> {
        self.inner.wait()
    }
    fn finish(&mut self) -> Result<(), CollectiveError> {
        self.inner.finish()
    }
    fn reduce_tensor_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.inner.reduce_tensor_sum(t)
    }
    fn reduce_tensor_sum_exact(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if Some(self.exact_calls) == self.at {
            self.inner.abort_handle().abort("injected between the gradient and BatchNorm all-reduces");
        }
        self.exact_calls += 1;
        self.inner.reduce_tensor_sum_exact(t)
    }
    fn start_reduce_grads(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.inner.start_reduce_grads(t)
    }
    fn finish_reduce_grads(&mut self) -> Result<(), CollectiveError> {
        self.inner.finish_reduce_grads()
    }
    fn completion(&mut self) -> Option<Completion> {
        self.commits += 1;
        match self.device_state {
            Some((from, state)) if self.commits > from => {
                // Running for a moment, then `state`: what NCCL's works report after a step.
                let settles = std::time::Instant::now() + Duration::from_millis(50);
                Some(Completion::new(move || {
                    if std::time::Instant::now() < settles {
                        CompletionState::Running
                    } else {
                        state
                    }
                }))
            }
            _ => self.inner.completion(),
        }
    }
}

type Ended = (Result<TrainOutcome, TrainError>, Audit);

/// Runs `members` as the ranks of attempt `attempt`, in threads, over a real loopback
/// ring, or the gloo group agreed over it.
fn run_group(kind: Comm, attempt: u32, members: Vec<Member>, data: &Datasets) -> Vec<Ended> {
    let world = members.len();
    support::with_comm_scoped(kind, world, Duration::from_secs(30), |rank, mut group| {
        let m = &members[rank];
        if m.abort_bn_at.is_some() || m.device_state_from.is_some() {
            group = Box::new(AbortAtBatchNorm {
                inner: group,
                at: m.abort_bn_at,
                exact_calls: 0,
                device_state: m.device_state_from,
                commits: 0,
            });
        }
        let comm = group.as_mut();
        let cfg = trainer_config::cpu(spec(), rank, world);
        let start = if m.live {
            let mut own = live_state::take(&m.slot, JOB, attempt - 1, attempt);
            let start = live_state::agree(&mut own, &cfg.spec, Device::Cpu, LEN, u32::MAX, comm).unwrap();
            live_state::put_back(&m.slot, own);
            Some(start.expect("a member held a live state"))
        } else {
            None
        };
        let mut audit = Audit { stop_at: m.stop_at, ..Default::default() };
        let keep = Some((m.slot.clone(), JOB.to_string(), attempt));
        let out = train::train_from(&cfg, data, comm, &mut audit, start, keep);
        (out, audit)
    })
}

fn slots(n: usize) -> Vec<LiveSlot> {
    (0..n).map(|_| LiveSlot::default()).collect()
}

/// The position a slot's state is at: (epoch, complete steps of its segment).
fn kept_at(slot: &LiveSlot) -> (u32, u64) {
    let s = slot.lock().unwrap();
    let s = s.as_ref().expect("a state was kept");
    (s.at.epoch, s.at.steps)
}

fn metrics_bits(h: &[EpochMetrics]) -> Vec<[u64; 4]> {
    h.iter().map(|m| [m.train_loss, m.train_acc, m.test_loss, m.test_acc].map(f64::to_bits)).collect()
}

fn assert_same_weights(a: &TrainOutcome, b: &TrainOutcome) {
    assert_eq!(a.variables.len(), b.variables.len());
    for ((na, ta), (nb, tb)) in a.variables.iter().zip(&b.variables) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs from the uninterrupted run");
    }
}

/// Two ranks, uninterrupted: the reference.
/// Every rank of a continued group ends with the uninterrupted run's weights and metrics
/// bit for bit, and trained nothing before `from` (epoch, step).
fn assert_continued_like(out: Vec<Ended>, want: &TrainOutcome, from: (u32, u64), what: &str) {
    for (rank, (r, audit)) in out.into_iter().enumerate() {
        let got = r.unwrap();
        assert_same_weights(&got, want);
        assert_eq!(metrics_bits(&got.history), metrics_bits(&want.history), "{what} rank {rank}");
        assert_eq!(audit.batches.first().map(|(e, s, _)| (*e, *s)), Some(from), "{what} rank {rank}");
    }
}

fn reference(kind: Comm, data: &Datasets) -> TrainOutcome {
    let s = slots(2);
    let mut out = run_group(kind, 0, s.iter().map(member).collect(), data);
    out.remove(0).0.unwrap()
}

/// Attempt 0 of two ranks in which rank 1 stops before `step` of epoch 0: rank 0's slot
/// then holds the state of the last step both completed.
fn lose_rank_1_at(kind: Comm, step: u64, data: &Datasets) -> LiveSlot {
    let s = slots(2);
    let members = vec![member(&s[0]), Member { stop_at: Some((0, step)), ..member(&s[1]) }];
    let out = run_group(kind, 0, members, data);
    assert!(out.iter().all(|(r, _)| r.is_err()), "{kind:?}: both ranks end with an error");
    assert_eq!(kept_at(&s[0]), (0, step), "{kind:?}: the survivor keeps the last complete step");
    s[0].clone()
}

#[test]
fn a_replacement_continues_bit_identically_with_the_uninterrupted_metrics() {
    for kind in COMMS {
        a_replacement_continues_bit_identically_with_the_uninterrupted_metrics_on(kind);
    }
}

fn a_replacement_continues_bit_identically_with_the_uninterrupted_metrics_on(kind: Comm) {
    let data = datasets();
    let want = reference(kind, &data);
    let survivor = lose_rank_1_at(kind, 5, &data);
    // Attempt 1: the survivor as rank 0 and a fresh worker (empty slot) as rank 1.
    let members =
        vec![Member { live: true, ..member(&survivor) }, Member { live: true, ..member(&LiveSlot::default()) }];
    let out = run_group(kind, 1, members, &data);
    // Nothing before the survivor's position is trained again.
    assert_continued_like(out, &want, (0, 5), &format!("{kind:?}"));
}

/// An abort after a step's gradients were reduced and before its BatchNorm statistics were:
/// every rank keeps the state of the step before (weights, momentum and statistics alike,
/// nothing half-applied), and the group continues from it bit-identically.
#[test]
fn an_abort_between_the_gradient_and_batch_norm_all_reduces_keeps_the_step_before() {
    for kind in COMMS {
        an_abort_between_the_gradient_and_batch_norm_all_reduces_keeps_the_step_before_on(kind);
    }
}

fn an_abort_between_the_gradient_and_batch_norm_all_reduces_keeps_the_step_before_on(kind: Comm) {
    let data = datasets();
    let want = reference(kind, &data);
    let s = slots(2);
    let members = vec![member(&s[0]), Member { abort_bn_at: Some(5), ..member(&s[1]) }];
    let out = run_group(kind, 0, members, &data);
    assert!(out.iter().all(|(r, _)| r.is_err()), "{kind:?}: both ranks end with an error");
    for (rank, slot) in s.iter().enumerate() {
        assert_eq!(kept_at(slot), (0, 5), "{kind:?} rank {rank}: the step whose statistics were reduced");
    }
    let members = s.iter().map(|x| Member { live: true, ..member(x) }).collect();
    let out = run_group(kind, 1, members, &data);
    assert_continued_like(out, &want, (0, 5), &format!("{kind:?}"));
}

/// A state is kept only when the collectives it was built from completed on the device. On
/// NCCL the host goes on before a reduction finishes there; if the device later reports it
/// failed (an abort in flight), the weights hold undefined gradients: such a rank keeps
/// nothing and recovery falls back to the checkpoint. Here rank 1's group reports the
/// device state of its last commits (NCCL's, standing in for a GPU) while everything else
/// is the real ring and trainer: running, then failed, is not kept; running, then
/// succeeded, is.
#[test]
fn a_state_whose_device_collectives_failed_is_not_kept() {
    let data = datasets();
    for (state, kept) in [(CompletionState::Failed, false), (CompletionState::Succeeded, true)] {
        let s = slots(2);
        let rank_1 = Member { stop_at: Some((0, 5)), device_state_from: Some((3, state)), ..member(&s[1]) };
        let out = run_group(Comm::Ring, 0, vec![member(&s[0]), rank_1], &data);
        assert!(out.iter().all(|(r, _)| r.is_err()));
        assert_eq!(kept_at(&s[0]), (0, 5), "rank 0's own reductions completed");
        assert_eq!(s[1].lock().unwrap().is_some(), kept, "rank 1 whose last commits' collectives {state:?}");
    }
}

#[test]
fn survivors_at_different_steps_continue_from_the_furthest() {
    for kind in COMMS {
        survivors_at_different_steps_continue_from_the_furthest_on(kind);
    }
}

fn survivors_at_different_steps_continue_from_the_furthest_on(kind: Comm) {
    let data = datasets();
    let want = reference(kind, &data);
    // Two survivors of attempt 0 that completed 4 and 6 steps (as when the ring let one
    // finish steps the other did not).
    let behind = lose_rank_1_at(kind, 4, &data);
    let ahead = lose_rank_1_at(kind, 6, &data);
    let members = vec![Member { live: true, ..member(&behind) }, Member { live: true, ..member(&ahead) }];
    let out = run_group(kind, 1, members, &data);
    assert_continued_like(out, &want, (0, 6), &format!("{kind:?}, from the furthest step,"));
}

#[test]
fn a_smaller_group_trains_the_rest_of_the_epoch_once() {
    for kind in COMMS {
        a_smaller_group_trains_the_rest_of_the_epoch_once_on(kind);
    }
}

fn a_smaller_group_trains_the_rest_of_the_epoch_once_on(kind: Comm) {
    let data = datasets();
    let s = slots(3);
    // 384 samples on 3 ranks in batches of 16: 8 steps; rank 2 stops before step 3.
    let members = vec![member(&s[0]), member(&s[1]), Member { stop_at: Some((0, 3)), ..member(&s[2]) }];
    let first = run_group(kind, 0, members, &data);
    assert_eq!(kept_at(&s[0]), (0, 3));
    assert_eq!(kept_at(&s[1]), (0, 3));
    // The complete steps (0..3) of every rank of the first group, not the partial step 3.
    let mut seen = vec![0u32; LEN];
    for (_, audit) in &first {
        for (_, step, idx) in &audit.batches {
            if *step < 3 {
                idx.iter().for_each(|&i| seen[i] += 1);
            }
        }
    }
    assert_eq!(seen.iter().sum::<u32>(), 3 * 3 * 16);
    // The survivors go on as a group of 2: the other 240 samples of the order, 120 each.
    let out = run_group(kind, 1, s[..2].iter().map(|x| Member { live: true, ..member(x) }).collect(), &data);
    for (rank, (r, audit)) in out.iter().enumerate() {
        let got = r.as_ref().unwrap();
        assert_eq!(got.history.len(), 2);
        let epoch0: Vec<usize> = audit.batches.iter().filter(|b| b.0 == 0).flat_map(|b| b.2.clone()).collect();
        assert_eq!(epoch0.len(), 120, "{kind:?} rank {rank}");
        // Steps count on from where the epoch was: 144 samples = 4.5 steps of 32 → step 4.
        assert_eq!(audit.batches.first().map(|b| (b.0, b.1)), Some((0, 4)));
        epoch0.iter().for_each(|&i| seen[i] += 1);
        // The next epoch is the ordinary DistributedSampler shard of the new world size.
        let epoch1: Vec<usize> = audit.batches.iter().filter(|b| b.0 == 1).flat_map(|b| b.2.clone()).collect();
        assert_eq!(epoch1, sampler::rank_indices(LEN, 2, rank, 5, 1));
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "samples trained other than once: {:?}",
        seen.iter().enumerate().filter(|(_, n)| **n != 1).collect::<Vec<_>>()
    );
}

/// A state past the first epoch the coordinator has not recorded (`Assignment.live_max_epoch`)
/// is not used: its group trained an epoch whose report never arrived, and continuing from it
/// would leave that epoch out of the job's history. The state itself stays for a later use.
#[test]
fn a_state_past_the_unrecorded_epoch_is_not_used() {
    let spec = spec();
    let at = Position { epoch: 2, base: 0, world: 1, steps: 0 };
    let mut own = Some(live_state::LiveState {
        job_id: JOB.into(),
        attempt: 1,
        engine: Engine::new(&spec, Device::Cpu).unwrap(),
        at,
        partial: Default::default(),
        rank_sums: None,
    });
    let mut solo = Solo::new();
    let got = live_state::agree(&mut own, &spec, Device::Cpu, LEN, 1, &mut solo).unwrap();
    assert!(got.is_none(), "epoch 2 is past the unrecorded epoch 1");
    assert!(own.is_some(), "the state stays");
    let got = live_state::agree(&mut own, &spec, Device::Cpu, LEN, 2, &mut solo).unwrap();
    assert_eq!(got.map(|s| s.at), Some(at));
}
