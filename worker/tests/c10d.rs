//! The c10d data plane on CPU: real `ProcessGroupGloo` groups of threads over loopback,
//! rendezvoused through the authenticated store as a job's ranks are. Each op's result is
//! checked against the value computed here.

mod support;
mod trainer_config;

use cvdist_worker::collective::{CollectiveError, GradCompression};
use std::time::{Duration, Instant};
use support::{with_comm, Comm};
use tch::{Kind, Tensor};

const SECRET: &str = "c10d-test-secret";
const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn gloo_sums_broadcasts_and_barriers_like_the_ring() {
    for n in [2, 3] {
        let got = with_comm(Comm::Gloo, n, SECRET, TIMEOUT, move |rank, mut c| {
            assert_eq!((c.rank(), c.world_size()), (rank, n));
            let mut v: Vec<f32> = (0..1000).map(|i| (i * (rank + 1)) as f32).collect();
            c.all_reduce_sum(&mut v).unwrap();
            let mut b = vec![rank as f32; 7];
            c.broadcast(&mut b, n - 1).unwrap();
            c.barrier().unwrap();
            let mut t = Tensor::from_slice(&[rank as f32 + 0.5; 5]);
            c.reduce_tensor_sum_exact(&mut t).unwrap();
            (v, b, Vec::<f32>::try_from(&t).unwrap())
        });
        let k: f32 = (1..=n).map(|r| r as f32).sum();
        let halves: f32 = (0..n).map(|r| r as f32 + 0.5).sum();
        for (v, b, t) in got {
            assert!(v.iter().enumerate().all(|(i, x)| *x == i as f32 * k), "world {n}: sum");
            assert_eq!(b, vec![(n - 1) as f32; 7]);
            assert_eq!(t, vec![halves; 5]);
        }
    }
}

/// Compressed gradient buckets: cast, reduce and write-back in one order, the same result
/// on every rank, within the 16-bit rounding of the exact sum.
#[test]
fn compressed_buckets_equal_the_reference_sum_on_every_rank() {
    for wire in [GradCompression::None, GradCompression::Bf16, GradCompression::Fp16] {
        let n = 3;
        let got = with_comm(Comm::Gloo, n, SECRET, TIMEOUT, move |rank, mut c| {
            c.set_grad_compression(wire).unwrap();
            // Two buckets in flight at once, finished together as the comm thread does.
            let mut a = Tensor::from_slice(&values(rank, 0));
            let mut b = Tensor::from_slice(&values(rank, 1));
            c.start_reduce_grads(&mut a).unwrap();
            c.start_reduce_grads(&mut b).unwrap();
            c.finish_reduce_grads().unwrap();
            (Vec::<f32>::try_from(&a).unwrap(), Vec::<f32>::try_from(&b).unwrap())
        });
        for bucket in 0..2 {
            let exact: Vec<f64> = (0..4096).map(|i| (0..n).map(|r| values(r, bucket)[i] as f64).sum()).collect();
            let first = if bucket == 0 { &got[0].0 } else { &got[0].1 };
            for (r, (a, b)) in got.iter().enumerate() {
                let mine = if bucket == 0 { a } else { b };
                assert_eq!(mine, first, "{wire}: rank {r} differs from rank 0");
            }
            // Relative rounding of one 16-bit value (bf16: 2^-8, fp16: 2^-11), once per
            // rank's term and once per partial sum: 2n roundings at most.
            let unit = match wire {
                GradCompression::None => 1e-6,
                GradCompression::Bf16 => 2f64.powi(-8),
                GradCompression::Fp16 => 2f64.powi(-11),
            };
            let scale: f64 = exact.iter().map(|x| x.abs()).fold(0.0, f64::max);
            for (i, (x, e)) in first.iter().zip(&exact).enumerate() {
                let bound = 2.0 * n as f64 * unit * scale.max(1e-3);
                assert!((*x as f64 - e).abs() <= bound, "{wire} bucket {bucket}[{i}]: {x} vs {e} (bound {bound})");
            }
        }
    }
}

fn values(rank: usize, bucket: usize) -> Vec<f32> {
    (0..4096).map(|i| (((i * 7 + rank * 13 + bucket * 5) % 97) as f32 - 48.0) * 0.01).collect()
}

/// An abort ends a collective a peer never joins within milliseconds, and the group
/// refuses every later op.
#[test]
fn an_abort_ends_a_stuck_gloo_collective_at_once() {
    let got = with_comm(Comm::Gloo, 2, SECRET, TIMEOUT, move |rank, mut c| {
        if rank == 1 {
            // Never joins; stays alive until rank 0 gave up.
            std::thread::sleep(Duration::from_secs(3));
            return None;
        }
        let abort = c.abort_handle();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            abort.abort("test abort");
        });
        let t0 = Instant::now();
        let mut v = vec![1.0f32; 100];
        let r = c.all_reduce_sum(&mut v);
        let took = t0.elapsed();
        let again = c.barrier();
        Some((r, took, again))
    });
    let (r, took, again) = got.into_iter().next().flatten().unwrap();
    assert!(matches!(r, Err(CollectiveError::Aborted(ref m)) if m == "test abort"), "{r:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(again.is_err());
}

#[test]
fn a_tensor_on_another_kind_or_layout_is_refused() {
    let got = with_comm(Comm::Gloo, 2, SECRET, TIMEOUT, |_, mut c| {
        let mut t = Tensor::zeros([4], (Kind::Double, tch::Device::Cpu));
        matches!(c.reduce_tensor_sum_exact(&mut t), Err(CollectiveError::Config(_)))
    });
    assert_eq!(got, vec![true, true]);
}

/// Records, at the start of every step, how many host-staged operations the group has run.
struct StagedAtEachStep {
    stats: std::sync::Arc<cvdist_worker::collective::c10d::GroupStats>,
    at_step: Vec<(u32, u64, u64)>,
}

impl cvdist_worker::train::Observer for StagedAtEachStep {
    fn batch_indices(&mut self, epoch: u32, step: u64, _indices: &[usize]) {
        let staged = self.stats.host_staged.load(std::sync::atomic::Ordering::Relaxed);
        self.at_step.push((epoch, step, staged));
    }
}

/// A training step runs no collective through a host buffer (on NCCL each such op blocks the
/// host until the device drains): the gradient buckets and the step's BatchNorm/metric
/// all-reduce stay device tensors. Counted by the real gloo group over two epochs of real
/// training, with the per-step BatchNorm average on (a kept live state) and off.
#[test]
fn training_steps_stage_no_collective_through_the_host() {
    use cvdist_worker::train::{self, live_state::LiveSlot};
    for keep in [false, true] {
        let ends = support::ring_ranks(2, SECRET, TIMEOUT, move |rank, ring, addrs| {
            tch::set_num_threads(1);
            let group = support::gloo_group(ring, addrs, SECRET, TIMEOUT);
            let mut observer = StagedAtEachStep { stats: group.stats(), at_step: Vec::new() };
            let mut comm = group;
            let mut spec = cvdist_common::spec::default_spec("resnet20", 2);
            spec.batch_size = 16;
            spec.dataset = "synthetic".into();
            let data = cvdist_worker::data::Datasets {
                train: std::sync::Arc::new(cvdist_common::cifar::synthetic(256, 3)),
                test: std::sync::Arc::new(cvdist_common::cifar::synthetic(32, 4)),
            };
            let cfg = trainer_config::cpu(spec, rank, 2);
            let slot = keep.then(|| (LiveSlot::default(), "j0001-staged".to_string(), 0));
            train::train_from(&cfg, &data, &mut comm, &mut observer, None, slot).unwrap();
            observer.at_step
        });
        for (rank, at_step) in ends.iter().enumerate() {
            assert_eq!(at_step.len(), 16, "rank {rank}: two epochs of 8 steps");
            for epoch in 0..2 {
                let staged: Vec<u64> = at_step.iter().filter(|s| s.0 == epoch).map(|s| s.2).collect();
                assert!(
                    staged.windows(2).all(|w| w[0] == w[1]),
                    "keep {keep}, rank {rank}, epoch {epoch}: host-staged ops at each step's start {staged:?}"
                );
            }
        }
    }
}
