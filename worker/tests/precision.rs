//! Mixed precision through real parts: `--precision bf16 --device cpu` end to end
//! in the real `cvdist-worker train` process, the fp16 loss scaler inside the real engine
//! (a skipped step changes nothing), and a divergence on one of two ranks connected by the
//! real TCP ring stopping both at the same step with the same error.

mod support;
mod trainer_config;

use cvdist_common::cifar;
use cvdist_common::proto::EpochMetrics;
use cvdist_worker::collective::{Collective, Solo};
use cvdist_worker::data::Datasets;
use cvdist_worker::train::engine::MAX_SKIPPED_IN_A_ROW;
use cvdist_worker::train::precision::Precision;
use cvdist_worker::train::scaler::{GradScaler, ScalerState, BACKOFF_FACTOR, INIT_SCALE};
use cvdist_worker::train::sync::GradSync;
use cvdist_worker::train::{self, Engine, Observer, TrainError};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// One epoch of resnet20 on 2,560 synthetic images in `precision`; returns the epoch's
/// metrics and the wall time of the process.
fn train_cli(precision: &str, out: &Path) -> (EpochMetrics, f64) {
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_cvdist-worker"))
        .args(["train", "--model", "resnet20", "--epochs", "1", "--dataset", "synthetic", "--device", "cpu"])
        .args(["--train-samples", "2560", "--test-samples", "1000", "--seed", "5", "--quiet", "--threads", "2"])
        // 160 small steps at a low rate: early training this short is chaotic (a rounding
        // difference grows into a different trajectory), less so with small, gentle steps;
        // docs/BENCHMARKS.md gives the seed-to-seed spread this was chosen from.
        .args(["--batch-size", "16", "--lr", "0.005", "--no-augment"])
        .args(["--precision", precision])
        .arg("--out")
        .arg(out)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(run.status.success(), "{precision}: {}", String::from_utf8_lossy(&run.stderr));
    let metrics = cvdist_common::run_dir::read_metrics(out).unwrap();
    assert_eq!(metrics.len(), 1);
    (metrics[0], seconds)
}

/// `--precision bf16 --device cpu` trains: finite losses, and accuracy within 3 points of
/// the fp32 run with the same seed — the training accuracy over the epoch's 2,560 images,
/// which unlike the test accuracy does not hinge on BatchNorm running statistics that 160
/// steps have barely settled. Prints both runs' figures (docs/BENCHMARKS.md).
#[test]
fn bf16_on_cpu_trains_like_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let (fp32, t32) = train_cli("fp32", &dir.path().join("fp32"));
    let (bf16, t16) = train_cli("bf16", &dir.path().join("bf16"));
    for (name, m, t) in [("fp32", &fp32, t32), ("bf16", &bf16, t16)] {
        println!(
            "{name}: {t:.1} s wall, train loss {:.4}, train acc {:.4}, test loss {:.4}, test acc {:.4}",
            m.train_loss, m.train_acc, m.test_loss, m.test_acc
        );
        assert!(m.train_loss.is_finite() && m.test_loss.is_finite(), "{name}: {m:?}");
    }
    // Both learned (chance is 10 %).
    assert!(fp32.train_acc > 0.5 && bf16.train_acc > 0.5, "fp32 {fp32:?}, bf16 {bf16:?}");
    assert!(
        (bf16.train_acc - fp32.train_acc).abs() <= 0.03,
        "bf16 {:.4} vs fp32 {:.4}",
        bf16.train_acc,
        fp32.train_acc
    );
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bf16").join("job.json")).unwrap()).unwrap();
    assert_eq!(job["precision"], "bf16", "{job}");
}

/// `--amp` combined with another precision is refused with one line.
#[test]
fn amp_with_another_precision_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_cvdist-worker"))
        .args([
            "train",
            "--model",
            "resnet20",
            "--epochs",
            "1",
            "--dataset",
            "synthetic",
            "--amp",
            "--precision",
            "bf16",
        ])
        .arg("--out")
        .arg(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        "error: --amp means --precision fp16 and cannot be combined with --precision bf16",
        "{stderr}"
    );
}

fn small_batch() -> (Tensor, Tensor) {
    tch::manual_seed(3);
    (Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu)), Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)))
}

fn snapshot(ts: &[(String, Tensor)]) -> Vec<Tensor> {
    ts.iter().map(|(_, t)| t.detach().copy()).collect()
}

fn identical(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.equal(y))
}

/// The loss scaler inside the real engine (resnet20, CPU): a clean step unscales and
/// applies; a step with an injected inf gradient is skipped — weights and momentum bit for
/// bit unchanged — and backs the scale off with the tracker reset.
#[test]
fn skipped_fp16_step_leaves_weights_and_momentum_unchanged() {
    tch::set_num_threads(1);
    let mut spec = cvdist_common::spec::default_spec("resnet20", 1);
    spec.dataset = "synthetic".into();
    let mut engine = Engine::new(&spec, Device::Cpu).unwrap();
    assert_eq!(engine.precision, Precision::Fp32);
    // fp16 autocast itself needs CUDA; the scaler logic is device-independent.
    engine.scaler = Some(GradScaler::new(Device::Cpu));
    let mut sync = GradSync::new();
    let mut solo = Solo::new();
    let (x, y) = small_batch();

    // A clean step: gradients come back unscaled (compared with a run without scaler).
    let out = engine.forward_backward(&x, &y);
    let scaled = engine.sgd.params()[0].1.grad().copy();
    let (_, applied) = engine.finish_step(&mut sync, &mut solo as &mut dyn Collective, &out.loss, 0.1, (0, 0)).unwrap();
    assert!(applied);
    let unscaled = engine.sgd.params()[0].1.grad();
    assert!(unscaled.allclose(&(&scaled / INIT_SCALE), 1e-6, 1e-12, false));
    assert_eq!(engine.scaler.as_ref().unwrap().state(), ScalerState { scale: INIT_SCALE, growth_tracker: 1 });

    // An overflowed step is skipped.
    let out = engine.forward_backward(&x, &y);
    let weights = snapshot(engine.sgd.params());
    let momentum = snapshot(&engine.sgd.momentum_buffers());
    let g = engine.sgd.params()[3].1.grad();
    let _ = g.narrow(0, 0, 1).fill_(f64::INFINITY);
    let (_, applied) = engine.finish_step(&mut sync, &mut solo as &mut dyn Collective, &out.loss, 0.1, (0, 1)).unwrap();
    assert!(!applied);
    assert!(identical(&weights, &snapshot(engine.sgd.params())), "weights changed on a skipped step");
    assert!(identical(&momentum, &snapshot(&engine.sgd.momentum_buffers())), "momentum changed on a skipped step");
    assert_eq!(
        engine.scaler.as_ref().unwrap().state(),
        ScalerState { scale: INIT_SCALE * BACKOFF_FACTOR, growth_tracker: 0 }
    );
}

/// An fp16 forward overflow (an input of inf makes the loss itself NaN) is what torch.amp
/// makes of it: the step is skipped and the scale backed off, the run is not diverged and
/// trains on; only `MAX_SKIPPED_IN_A_ROW` skips in a row end it, naming the first.
#[test]
fn a_forward_overflow_under_fp16_skips_the_step_instead_of_failing_the_run() {
    tch::set_num_threads(1);
    let mut spec = cvdist_common::spec::default_spec("resnet20", 1);
    spec.dataset = "synthetic".into();
    let mut engine = Engine::new(&spec, Device::Cpu).unwrap();
    engine.scaler = Some(GradScaler::new(Device::Cpu));
    let mut sync = GradSync::new();
    let mut solo = Solo::new();
    let (x, y) = small_batch();
    let overflow = x.full_like(f64::INFINITY);
    let mut step = |engine: &mut Engine, images: &Tensor, at: u64| {
        let out = engine.forward_backward(images, &y);
        let loss = out.loss.double_value(&[]);
        let r = engine.finish_step(&mut sync, &mut solo as &mut dyn Collective, &out.loss, 0.1, (0, at));
        (loss, r)
    };
    let weights = snapshot(engine.sgd.params());
    let (loss, r) = step(&mut engine, &overflow, 0);
    assert!(loss.is_nan(), "the forward pass overflowed: loss {loss}");
    assert!(!r.unwrap().1, "the step is skipped");
    assert!(identical(&weights, &snapshot(engine.sgd.params())), "weights changed on a skipped step");
    engine.check_divergence().expect("a skipped step is not a divergence");
    assert_eq!(engine.scaler.as_ref().unwrap().state().scale, INIT_SCALE * BACKOFF_FACTOR);
    let (loss, r) = step(&mut engine, &x, 1);
    assert!(loss.is_finite() && r.unwrap().1, "the next clean batch trains");
    engine.check_divergence().unwrap();

    for k in 0..MAX_SKIPPED_IN_A_ROW - 1 {
        let (_, r) = step(&mut engine, &overflow, 2 + u64::from(k));
        assert!(!r.unwrap().1, "skip {k}");
    }
    let (_, r) = step(&mut engine, &overflow, 2 + u64::from(MAX_SKIPPED_IN_A_ROW - 1));
    let err = r.unwrap_err();
    assert_eq!(err.failure_kind(), cvdist_common::proto::FailureKind::Diverged);
    assert!(
        err.to_string().starts_with(&format!(
            "training diverged at epoch 0 step 2: the fp16 loss scaler skipped {MAX_SKIPPED_IN_A_ROW} steps in a row"
        )),
        "{err}"
    );
}

/// Poisons one rank's loss at one step.
struct PoisonAt {
    rank: usize,
    poison_rank: usize,
    at: (u32, u64),
}

impl Observer for PoisonAt {
    fn poison_loss(&mut self, epoch: u32, step: u64) -> bool {
        self.rank == self.poison_rank && (epoch, step) == self.at
    }
}

/// Two ranks on the real ring; only rank 1's loss goes NaN at epoch 0 step 2. Both stop
/// at that step with the same `Diverged` error (not rank 0 failing later on a closed
/// socket, which the coordinator would have retried), quickly.
#[test]
fn divergence_on_one_rank_stops_both_at_the_same_step_with_the_same_error() {
    let data = Datasets { train: Arc::new(cifar::synthetic(128, 3)), test: Arc::new(cifar::synthetic(20, 4)) };
    let started = Instant::now();
    let results: Vec<Result<train::TrainOutcome, TrainError>> =
        support::scoped_ranks(2, Duration::from_secs(30), |rank, mut ring, _| {
            let mut spec = cvdist_common::spec::default_spec("resnet20", 1);
            spec.dataset = "synthetic".into();
            spec.batch_size = 16;
            let cfg = trainer_config::cpu(spec, rank, 2);
            let mut observer = PoisonAt { rank, poison_rank: 1, at: (0, 2) };
            train::train(&cfg, &data, &mut ring as &mut dyn Collective, &mut observer)
        });
    let errors: Vec<String> = results
        .into_iter()
        .map(|r| match r {
            Err(e @ TrainError::Diverged { epoch: 0, step: 2, .. }) => e.to_string(),
            Err(e) => panic!("expected a divergence at epoch 0 step 2, got: {e}"),
            Ok(_) => panic!("a rank trained on past a NaN loss"),
        })
        .collect();
    assert_eq!(errors[0], errors[1]);
    assert_eq!(errors[0], "training diverged at epoch 0 step 2: loss is NaN");
    // Far below the ring's 30 s timeout: nobody waited for a peer that had stopped.
    assert!(started.elapsed() < Duration::from_secs(25), "{:?}", started.elapsed());
}
