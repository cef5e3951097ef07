//! The gradient all-reduce overlapped with backward, through the real pieces: the C++
//! gradient-ready hooks on libtorch's autograd, the comm thread, and a real loopback TCP
//! ring between two ranks in one process.
//!
//! - gradients stay views into their buckets with the hooks installed, the buckets are
//!   handed over during backward, and the averaged gradients are bit for bit the mean of
//!   the ranks' own gradients;
//! - the probe finds the order backward produces a real model's gradients;
//! - a parameter without a gradient does not hold up its bucket;
//! - a peer lost or stalled mid-backward, or the job's abort, ends the step with the
//!   collective error instead of a hang.

mod support;

use cvdist_worker::collective::{ring::Ring, Collective, CollectiveError};
use cvdist_worker::train::buckets::{self, Buckets};
use cvdist_worker::train::overlap::{self, GradHooks};
use cvdist_worker::train::sync::{GradSync, SyncError};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// Far above anything these tests need; only a hang reaches it.
const HANG: Duration = Duration::from_secs(300);

/// Ends the test process if the test does not finish within [`HANG`]: a deadlock between
/// the backward thread and the comm thread must fail the test, not stall the suite.
struct HangGuard(Option<mpsc::Sender<()>>);

impl HangGuard {
    fn new(what: &'static str) -> HangGuard {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HANG) {
                eprintln!("{what}: no result after {HANG:?}: deadlock");
                std::process::exit(101);
            }
        });
        HangGuard(Some(tx))
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Three hidden layers and two heads; `head_b` is used only when asked.
struct Net {
    layers: Vec<nn::Linear>,
    head_a: nn::Linear,
    head_b: nn::Linear,
}

impl Net {
    fn new(vs: &nn::Path) -> Net {
        let layers = (0..3).map(|i| nn::linear(vs / format!("l{i}"), 16, 16, Default::default())).collect();
        Net {
            layers,
            head_a: nn::linear(vs / "head_a", 16, 4, Default::default()),
            head_b: nn::linear(vs / "head_b", 16, 4, Default::default()),
        }
    }

    fn loss(&self, x: &Tensor, use_b: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for l in &self.layers {
            h = l.forward(&h).relu();
        }
        let mut out = self.head_a.forward(&h);
        if use_b {
            out += self.head_b.forward(&h);
        }
        out.square().mean(Kind::Float)
    }
}

/// Rank `rank`'s batch at `step`: fixed, different per rank and step.
fn input(rank: usize, step: usize) -> Tensor {
    (Tensor::arange(8 * 16, (Kind::Float, Device::Cpu)) * (0.013 * (rank + 1) as f64 + 0.007 * step as f64))
        .sin()
        .view([8, 16])
}

/// The same initial weights every time (libtorch's generator is process-wide).
fn model() -> (VarStore, Net, Vec<(String, Tensor)>) {
    static SEED: Mutex<()> = Mutex::new(());
    let _g = SEED.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root());
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    (vs, net, params)
}

/// Bucket order by name: the heads, then the layers from the last to the first (the
/// order backward produces them). With the caps below: [heads] [l2] [l1] [l0].
fn reverse_forward(params: &[(String, Tensor)], first: &[&str]) -> Vec<usize> {
    let names = ["head_a.bias", "head_a.weight", "head_b.bias", "head_b.weight"];
    let mut prefix: Vec<&str> = first.to_vec();
    prefix.extend(names.iter().filter(|n| !first.contains(n)));
    prefix.extend(["l2.bias", "l2.weight", "l1.bias", "l1.weight", "l0.bias", "l0.weight"]);
    prefix.iter().map(|n| params.iter().position(|(p, _)| p == n).expect("name")).collect()
}

struct Rank {
    _vs: VarStore,
    net: Net,
    params: Vec<(String, Tensor)>,
    buckets: Buckets,
    hooks: GradHooks,
}

fn rank_model(first: &[&str]) -> Rank {
    let (vs, net, params) = model();
    let order = reverse_forward(&params, first);
    let buckets = Buckets::in_order(&params, &order, 136, 300).expect("buckets");
    assert_eq!(buckets.len(), 4);
    let hooks = GradHooks::register(&params, &buckets).expect("hooks");
    Rank { _vs: vs, net, params, buckets, hooks }
}

/// Each rank's own gradients for `step`, without hooks or buckets, by name.
fn local_grads(rank: usize, step: usize, use_b: bool) -> Vec<(String, Tensor)> {
    let (_vs, net, params) = model();
    net.loss(&input(rank, step), use_b).backward();
    params
        .iter()
        .map(|(n, p)| {
            let g = p.grad();
            (n.clone(), if g.defined() { g.copy() } else { p.zeros_like() })
        })
        .collect()
}

/// Runs `body` for ranks 0 and 1 on threads joined by a real loopback ring whose ops
/// time out after `timeout`.
fn pair<T: Send>(timeout: Duration, body: impl Fn(usize, Ring) -> T + Sync) -> Vec<T> {
    pair_of(timeout, |_, ring| ring, body)
}

/// [`pair`] on a communicator of kind `kind` (the ring, or a c10d gloo group agreed over it).
fn pair_on<T: Send>(
    kind: support::Comm,
    timeout: Duration,
    body: impl Fn(usize, Box<dyn Collective>) -> T + Sync,
) -> Vec<T> {
    pair_of(timeout, |peers, ring| support::into_comm(kind, ring, peers, "secret", timeout), body)
}

/// Ranks 0 and 1 on threads: a loopback ring, made into a communicator by `make`, given to
/// `body`.
fn pair_of<C, T: Send>(
    timeout: Duration,
    make: impl Fn(&[String], Ring) -> C + Sync,
    body: impl Fn(usize, C) -> T + Sync,
) -> Vec<T> {
    support::scoped_ranks(2, timeout, |rank, ring, peers| body(rank, make(peers, ring)))
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap()
}

/// Whether `t`'s storage lies inside `buffer`'s.
fn inside(t: &Tensor, buffer: &Tensor) -> bool {
    let (start, len) = (buffer.data_ptr() as usize, buffer.numel() * 4);
    let p = t.data_ptr() as usize;
    p >= start && p + t.numel() * 4 <= start + len
}

/// Hooks on, three steps over a real ring. After each backward the gradients are still
/// views into their buckets and every bucket but the last (which waits for the divergence
/// flag) was handed to the comm thread by the hooks, during backward; the reduced
/// gradients are exactly (bit for bit) the mean of the two ranks' own gradients, and the
/// flag agrees.
#[test]
fn buckets_are_handed_over_during_backward_and_reduce_to_the_exact_mean() {
    let _guard = HangGuard::new("overlap pair");
    let results = pair(Duration::from_secs(60), |rank, mut ring| three_overlapped_steps(rank, &mut ring));
    assert_exact_means(&results);
}

/// The same on PyTorch's c10d gloo group: buckets are started during backward and
/// finished with the last one, and the result is the same exact mean.
#[test]
fn gloo_buckets_are_handed_over_during_backward_and_reduce_to_the_exact_mean() {
    let _guard = HangGuard::new("overlap pair on gloo");
    let results = pair_on(support::Comm::Gloo, Duration::from_secs(60), |rank, mut comm| {
        three_overlapped_steps(rank, comm.as_mut())
    });
    assert_exact_means(&results);
}

type StepGrads = Vec<Vec<(String, Vec<f32>)>>;

fn three_overlapped_steps(rank: usize, comm: &mut dyn Collective) -> StepGrads {
    overlap::with_comm_thread(comm, Device::Cpu, |proxy, lane| {
        let mut r = rank_model(&[]);
        buckets::check_same_layout(&r.buckets, proxy).expect("same layout");
        let mut sync = GradSync::overlapped(r.hooks.connect(lane));
        let mut steps = Vec::new();
        for step in 0..3 {
            r.buckets.zero_grads();
            let loss = r.net.loss(&input(rank, step), true);
            loss.backward();
            let ov = sync.overlap().expect("overlapped");
            assert_eq!(ov.launched(), ov.buckets() - 1, "step {step}: buckets handed over during backward");
            assert_eq!(ov.buckets(), 4);
            for (name, p) in &r.params {
                let b = r.buckets.bucket_of(r.params.iter().position(|(n, _)| n == name).unwrap());
                assert!(inside(&p.grad(), &r.buckets.reduce_buffer(b)), "{name}'s gradient left its bucket");
            }
            let reduced = sync.reduce(&mut r.buckets, proxy, &loss, None).expect("reduce");
            assert_eq!(reduced.flag.view([-1]).double_value(&[0]), 0.0, "no rank diverged");
            assert!(reduced.apply);
            assert_eq!(sync.overlap().unwrap().launched(), 0, "every bucket went; the next step starts over");
            steps.push(r.params.iter().map(|(n, p)| (n.clone(), values(&p.grad()))).collect::<Vec<_>>());
        }
        steps
    })
    .expect("comm thread")
}

fn assert_exact_means(results: &[StepGrads]) {
    for step in 0..3 {
        let (g0, g1) = (local_grads(0, step, true), local_grads(1, step, true));
        for (k, ((name, a), (_, b))) in g0.iter().zip(&g1).enumerate() {
            let mean = values(&((a + b) * 0.5));
            for (rank, got) in results.iter().enumerate() {
                assert_eq!(got[step][k].0, *name);
                assert_eq!(got[step][k].1, mean, "rank {rank} step {step} {name}");
            }
        }
    }
}

/// `head_b` gets no gradient, and it shares the first bucket, so no bucket can go during
/// backward (they go in order). The end of backward marks it ready with zeros: every step
/// completes, its averaged gradient is zero and the rest is the exact mean.
#[test]
fn a_parameter_without_gradient_does_not_hold_up_its_bucket() {
    let _guard = HangGuard::new("unused head");
    let results = pair(Duration::from_secs(60), |rank, mut ring| {
        overlap::with_comm_thread(&mut ring, Device::Cpu, |proxy, lane| {
            let mut r = rank_model(&["head_b.bias", "head_b.weight"]);
            let mut sync = GradSync::overlapped(r.hooks.connect(lane));
            let mut steps = Vec::new();
            for step in 0..2 {
                r.buckets.zero_grads();
                let loss = r.net.loss(&input(rank, step), false);
                loss.backward();
                assert_eq!(sync.overlap().unwrap().launched(), 0, "the first bucket waits for head_b");
                sync.reduce(&mut r.buckets, proxy, &loss, None).expect("reduce");
                steps.push(r.params.iter().map(|(n, p)| (n.clone(), values(&p.grad()))).collect::<Vec<_>>());
            }
            steps
        })
        .expect("comm thread")
    });
    for step in 0..2 {
        let (g0, g1) = (local_grads(0, step, false), local_grads(1, step, false));
        for (k, ((name, a), (_, b))) in g0.iter().zip(&g1).enumerate() {
            for got in &results {
                if name.starts_with("head_b") {
                    assert!(got[step][k].1.iter().all(|&v| v == 0.0), "{name} must be zero");
                } else {
                    assert_eq!(got[step][k].1, values(&((a + b) * 0.5)), "step {step} {name}");
                }
            }
        }
    }
}

/// Wraps rank 0's ring: the first gradient bucket (handed over by a hook, mid-backward)
/// first makes rank 1 drop its end of the ring, so the reduction meets a lost peer.
struct Tripwire {
    inner: Ring,
    die: Option<mpsc::Sender<()>>,
    dead: mpsc::Receiver<()>,
}

impl Collective for Tripwire {
    support::delegate_required_collective!(inner);
    fn reduce_tensor_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if let Some(die) = self.die.take() {
            let _ = die.send(());
            let _ = self.dead.recv();
        }
        self.inner.reduce_tensor_sum(t)
    }
}

/// One overlapped step on rank 0 against `comm`; returns the step's error and how long
/// `reduce` took. Backward hands the buckets over; the step must end with an error.
fn failing_step(comm: &mut dyn Collective, after_backward: impl FnOnce()) -> (SyncError, Duration, SyncError) {
    overlap::with_comm_thread(comm, Device::Cpu, |proxy, lane| {
        let mut r = rank_model(&[]);
        let mut sync = GradSync::overlapped(r.hooks.connect(lane));
        r.buckets.zero_grads();
        let loss = r.net.loss(&input(0, 0), true);
        loss.backward();
        after_backward();
        let start = Instant::now();
        let err = sync.reduce(&mut r.buckets, proxy, &loss, None).expect_err("the step must fail");
        let took = start.elapsed();
        // The next step fails too, at once: the communicator is unusable.
        r.buckets.zero_grads();
        let loss = r.net.loss(&input(0, 1), true);
        loss.backward();
        let again = sync.reduce(&mut r.buckets, proxy, &loss, None).expect_err("broken ring");
        (err, took, again)
    })
    .expect("comm thread")
}

/// Rank 1 drops out while rank 0's backward hands over its first bucket. The step ends
/// with the ring's error (not the timeout, not a hang), and so does the next.
#[test]
fn a_peer_lost_mid_backward_ends_the_step_with_the_collective_error() {
    let _guard = HangGuard::new("peer lost");
    let (die_tx, die_rx) = mpsc::channel();
    let (dead_tx, dead_rx) = mpsc::channel();
    let (die_rx, dead_rx) = (Mutex::new(Some(die_rx)), Mutex::new(Some(dead_rx)));
    let (die_tx, dead_tx) = (Mutex::new(Some(die_tx)), Mutex::new(Some(dead_tx)));
    let timeout = Duration::from_secs(120);
    let out = pair(timeout, |rank, ring| {
        if rank == 1 {
            let die: mpsc::Receiver<()> = die_rx.lock().unwrap().take().unwrap();
            let _ = die.recv();
            drop(ring);
            let _ = dead_tx.lock().unwrap().take().unwrap().send(());
            return None;
        }
        let die = die_tx.lock().unwrap().take();
        let dead = dead_rx.lock().unwrap().take().unwrap();
        let mut wire = Tripwire { inner: ring, die, dead };
        Some(failing_step(&mut wire, || {}))
    });
    let (err, took, again) = out.into_iter().flatten().next().expect("rank 0's result");
    assert!(
        matches!(
            err,
            SyncError::Collective(
                CollectiveError::PeerClosed { .. } | CollectiveError::Io { .. } | CollectiveError::Broken(_)
            )
        ),
        "{err:?}"
    );
    assert!(took < timeout / 2, "ended by the lost peer, not the {timeout:?} timeout: took {took:?}");
    assert!(matches!(again, SyncError::Collective(_)), "{again:?}");
}

/// Rank 1 stays connected but never takes part. Rank 0's step ends with the ring's
/// timeout error at `--collective-timeout`, not a hang.
#[test]
fn a_stalled_peer_ends_the_step_at_the_collective_timeout() {
    let _guard = HangGuard::new("stalled peer");
    let timeout = Duration::from_secs(2);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = (Mutex::new(Some(done_tx)), Mutex::new(Some(done_rx)));
    let out = pair(timeout, |rank, mut ring| {
        if rank == 1 {
            // Holds the ring open without taking part until rank 0 is done.
            let _ = done_rx.lock().unwrap().take().unwrap().recv();
            return None;
        }
        let result = failing_step(&mut ring, || {});
        drop(done_tx.lock().unwrap().take());
        Some(result)
    });
    let (err, took, again) = out.into_iter().flatten().next().expect("rank 0's result");
    assert!(matches!(err, SyncError::Collective(CollectiveError::Timeout { .. })), "{err:?}");
    assert!(took >= timeout && took < timeout + Duration::from_secs(60), "took {took:?}");
    assert!(matches!(again, SyncError::Collective(_)), "{again:?}");
}

/// The job's abort (the coordinator ended the attempt) ends a step whose buckets wait on
/// a stalled peer at once, long before the timeout.
#[test]
fn the_jobs_abort_ends_an_overlapped_step_at_once() {
    let _guard = HangGuard::new("abort");
    abort_ends_a_stalled_step(support::Comm::Ring);
}

/// The same on a gloo group: gloo cannot interrupt its collective, but the wait polls the
/// abort.
#[test]
fn the_jobs_abort_ends_an_overlapped_step_on_gloo_at_once() {
    let _guard = HangGuard::new("abort on gloo");
    abort_ends_a_stalled_step(support::Comm::Gloo);
}

fn abort_ends_a_stalled_step(kind: support::Comm) {
    let timeout = Duration::from_secs(600);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = (Mutex::new(Some(done_tx)), Mutex::new(Some(done_rx)));
    let out = pair_on(kind, timeout, |rank, mut comm| {
        if rank == 1 {
            let _ = done_rx.lock().unwrap().take().unwrap().recv();
            return None;
        }
        let abort = comm.abort_handle();
        let result = failing_step(comm.as_mut(), move || {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                abort.abort("job cancelled");
            });
        });
        drop(done_tx.lock().unwrap().take());
        Some(result)
    });
    let (err, took, again) = out.into_iter().flatten().next().expect("rank 0's result");
    assert!(matches!(err, SyncError::Collective(CollectiveError::Aborted(ref r)) if r == "job cancelled"), "{err:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(matches!(again, SyncError::Collective(_)), "{again:?}");
}

/// The probe finds resnet20's gradient order: the classifier first, the stem convolution
/// last, every parameter once; the same order each time; the probe leaves BatchNorm's
/// running statistics as they were.
#[test]
fn the_probe_orders_a_real_model_as_backward_produces_its_gradients() {
    let vs = VarStore::new(Device::Cpu);
    let model = cvdist_worker::models::build("resnet20", &vs.root(), 10).expect("model");
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let (params, buffers): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(_, t)| t.requires_grad());
    let before: Vec<Vec<f32>> =
        buffers.iter().filter(|(_, t)| t.kind() == Kind::Float).map(|(_, t)| values(t)).collect();
    let order = overlap::ready_order(&params, model.as_ref(), Device::Cpu).expect("probe");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..params.len()).collect::<Vec<_>>(), "a permutation");
    let names: Vec<&str> = order.iter().map(|&i| params[i].0.as_str()).collect();
    let first_layer = |n: &str| !n.starts_with("layer") && n.contains("conv");
    assert!(!first_layer(names[0]) && !names[0].starts_with("layer") && !names[0].starts_with("bn"), "{names:?}");
    assert!(first_layer(names[names.len() - 1]), "the stem convolution is finished last: {names:?}");
    assert_eq!(overlap::ready_order(&params, model.as_ref(), Device::Cpu).expect("probe"), order);
    let after: Vec<Vec<f32>> =
        buffers.iter().filter(|(_, t)| t.kind() == Kind::Float).map(|(_, t)| values(t)).collect();
    assert_eq!(before, after, "running statistics untouched");
}

/// Ranks whose buckets are laid out differently would add unrelated gradients: the
/// layout check refuses them on every rank before any gradient is reduced.
#[test]
fn ranks_with_different_bucket_layouts_are_refused() {
    let _guard = HangGuard::new("layout check");
    let out = pair(Duration::from_secs(60), |rank, mut ring| {
        let first: &[&str] = if rank == 0 { &[] } else { &["head_b.bias", "head_b.weight"] };
        let r = rank_model(first);
        buckets::check_same_layout(&r.buckets, &mut ring)
    });
    for (rank, result) in out.into_iter().enumerate() {
        match result {
            Err(CollectiveError::Config(m)) => assert!(m.contains("different gradient buckets"), "rank {rank}: {m}"),
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

/// `--bucket-cap-mb` (JobSpec field 27) sizes the buckets: resnet18's 42.6 MB of gradients in
/// 25 MB buckets (DDP's default) make 3, in 4 MB buckets (ours) 10 or more; no bucket is
/// over its cap unless a single parameter is (then it is alone), and the first is at most 1 MB.
#[test]
fn the_bucket_cap_of_the_spec_sizes_the_buckets() {
    let layout = |cap: u32| {
        let mut spec = cvdist_common::spec::default_spec("resnet18", 1);
        spec.bucket_cap_mb = cap;
        let engine = cvdist_worker::train::Engine::new(&spec, Device::Cpu).expect("engine");
        let b = engine.sgd.buckets();
        let sizes: Vec<(i64, usize)> = (0..b.len()).map(|i| (b.numels()[i], b.params_of(i).len())).collect();
        sizes
    };
    let mb = |elems: i64| elems as f64 * 4.0 / (1024.0 * 1024.0);
    let default = layout(4);
    assert_eq!(layout(0), default, "0 (a spec from before the field) is the default, 4 MB");
    for (cap, sizes) in [(25u32, layout(25)), (4, default)] {
        let total: f64 = sizes.iter().map(|&(n, _)| mb(n)).sum();
        assert!((total - 42.6).abs() < 0.5, "resnet18 has 11.17 M parameters: {total} MB");
        assert!(mb(sizes[0].0) <= 1.0, "first bucket {} MB", mb(sizes[0].0));
        for &(n, params) in &sizes {
            assert!(
                mb(n) <= f64::from(cap) || params == 1,
                "a {} MB bucket of {params} parameters over {cap} MB",
                mb(n)
            );
        }
        let want = if cap == 25 { 3..=3 } else { 10..=40 };
        assert!(want.contains(&sizes.len()), "{} buckets at {cap} MB: {sizes:?}", sizes.len());
    }
}

/// A panic in the step (a tch call unwrapping a CUDA out-of-memory error, say) while a
/// sender of the comm thread's queue lives on elsewhere (the hooks of a model kept for live
/// recovery) ends the comm thread, so the panic reaches the job thread, which reports it,
/// instead of the scope waiting forever for more buckets.
#[test]
fn a_panic_in_the_step_ends_the_comm_thread_even_with_a_sender_kept_elsewhere() {
    static KEPT: Mutex<Option<overlap::Lane>> = Mutex::new(None);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut comm = cvdist_worker::collective::Solo::new();
            overlap::with_comm_thread(&mut comm, Device::Cpu, |_proxy, lane| {
                *KEPT.lock().unwrap_or_else(|e| e.into_inner()) = Some(lane);
                panic!("injected: CUDA out of memory");
            })
        }));
        let _ = tx.send(r.is_err());
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "the panic never came back: the comm thread hangs");
}
