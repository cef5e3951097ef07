//! "Results people can look at", end to end through the `cvdist-worker` binary:
//!
//! train a tiny resnet20 briefly (with `--tensorboard`) → `eval --json-out` → `export` →
//! load the export into the PyTorch reference architecture (tests/python/reference_models.py)
//! with `strict=True` → identical predictions and logits within 1e-4 of their scale on the same test
//! images
//! → `import` PyTorch's own state_dict back → identical weights and logits → warm-start
//! `train --resume` from the imported checkpoint.
//!
//! Needs a Python with torch and safetensors: $CVDIST_PYTHON (set by scripts/env.sh), else
//! `python3`. A missing interpreter or module is a failure, not a skip.

mod tolerance;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cvdist_common::tensorboard;
use cvdist_worker::eval::{self, EvalReport};
use cvdist_worker::interop;
use tch::{Device, Kind, Tensor};

/// Largest allowed `max|Δ| / max(max|logit|, 1)` between cvdist's and PyTorch's logits on
/// identical weights: both sides run the same float32 math through different kernels, so they
/// differ by accumulation order only, which scales with the logits (floored at 1, a logit's
/// order) and not with a number tuned on one CPU — see `tolerance`.
const TOL: f64 = 1e-4;
const MODEL: &str = "resnet20";
const TEST_SAMPLES: usize = 100;

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cvdist-worker"));
    c.env("CVDIST_LOG", "warn");
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run cvdist-worker");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail with a single-line `error: ...` containing `needle`.
fn run_err(cmd: &mut Command, needle: &str) {
    let out = cmd.output().expect("run cvdist-worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} succeeded but should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line from {cmd:?}, got:\n{stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{cmd:?}: {stderr}");
}

fn python() -> String {
    std::env::var("CVDIST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn run_python(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/export_roundtrip.py");
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir)
        .arg(MODEL)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} (set CVDIST_PYTHON, see scripts/env.sh): {e}"));
    assert!(
        out.status.success(),
        "{py} export_roundtrip.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn argmax(logits: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&logits.argmax(-1, false)).unwrap()
}

fn confusion_of(labels: &Tensor, pred: &[i64]) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; 10]; 10];
    for (t, p) in Vec::<i64>::try_from(labels).unwrap().iter().zip(pred) {
        m[*t as usize][*p as usize] += 1;
    }
    m
}

fn read_one(path: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{} has no tensor {name:?}", path.display()))
        .1
}

fn train_args(out: &Path, train_samples: u32) -> Vec<String> {
    let mut a: Vec<String> =
        ["train", "--model", MODEL, "--epochs", "1", "--dataset", "synthetic", "--batch-size", "32"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    a.extend(["--lr", "0.02", "--device", "cpu", "--threads", "2", "--quiet"].map(String::from));
    a.extend(["--train-samples".into(), train_samples.to_string(), "--test-samples".into(), TEST_SAMPLES.to_string()]);
    a.extend(["--out".into(), out.display().to_string()]);
    a
}

#[test]
fn export_to_pytorch_and_import_back() {
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // 1. Train briefly: 512 synthetic images, 16 steps, enough for varied predictions.
    let run = dir.join("run");
    let tb = dir.join("tb");
    run_ok(worker().args(train_args(&run, 512)).arg("--tensorboard").arg(&tb));
    let ckpt: PathBuf = run.join("checkpoints/ckpt-e0001-s000000.json");
    assert!(ckpt.is_file(), "no checkpoint at {}", ckpt.display());

    // TensorBoard: a file-version record, then the epoch's scalars equal to metrics.jsonl.
    let files: Vec<PathBuf> = std::fs::read_dir(&tb).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    let events = tensorboard::read_events(&files[0]).unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].file_version.as_deref(), Some(tensorboard::FILE_VERSION));
    assert_eq!(events[1].step, 1);
    let metrics = cvdist_common::run_dir::read_metrics(&run).unwrap();
    let m = &metrics[0];
    let tags: Vec<&str> = events[1].scalars.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tags, ["train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "images_per_sec"]);
    assert_eq!(events[1].scalars[0].1, m.train_loss as f32);
    assert_eq!(events[1].scalars[3].1, m.test_acc as f32);
    assert_eq!(events[1].scalars[4].1, m.lr as f32);

    // 2. `eval`, on the .safetensors path to exercise that form too.
    let eval_json = dir.join("eval/eval.json");
    run_ok(
        worker()
            .args(["eval", "--dataset", "synthetic", "--device", "cpu", "--test-samples"])
            .arg(TEST_SAMPLES.to_string())
            .arg("--checkpoint")
            .arg(ckpt.with_extension("safetensors"))
            .arg("--json-out")
            .arg(&eval_json),
    );
    let report: EvalReport = serde_json::from_slice(&std::fs::read(&eval_json).unwrap()).unwrap();
    assert_eq!(report.model, MODEL);
    assert_eq!(report.samples, TEST_SAMPLES as u64);
    assert_eq!(report.classes.len(), 10);
    assert_eq!(report.per_class.len(), 10);
    assert_eq!(report.confusion.iter().flatten().sum::<u64>(), TEST_SAMPLES as u64);
    assert!(
        (report.accuracy - m.test_acc).abs() < 1e-9,
        "eval {} vs training's test accuracy {}",
        report.accuracy,
        m.test_acc
    );

    // 3. `export`; num_batches_tracked = steps taken (1 epoch of 512/32).
    let exported = dir.join("exported.safetensors");
    run_ok(worker().args(["export", "--checkpoint"]).arg(&ckpt).arg("--out").arg(&exported));
    let meta = interop::read_metadata(&exported).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    assert_eq!(meta.get("model").map(String::as_str), Some(MODEL));
    let counter = read_one(&exported, "layer2.0.bn1.num_batches_tracked");
    assert_eq!((counter.kind(), counter.dim(), counter.int64_value(&[])), (Kind::Int64, 0, 16));

    // 4. The Rust model's logits on the test images, as eval feeds them.
    let loaded = eval::load_model(&ckpt, Device::Cpu).unwrap();
    let split = eval::test_split(cvdist_common::choices::Dataset::Synthetic, None, TEST_SAMPLES as u64).unwrap();
    let (images, labels) = eval::images(&split, (0..TEST_SAMPLES).collect());
    let rust_logits = eval::logits(loaded.model.as_ref(), &images, Device::Cpu);
    let rust_pred = argmax(&rust_logits);
    assert_eq!(confusion_of(&labels, &rust_pred), report.confusion, "eval's confusion matrix vs the model's logits");
    let distinct: std::collections::BTreeSet<i64> = rust_pred.iter().copied().collect();
    assert!(
        distinct.len() >= 2,
        "the briefly trained model predicts a single class; the argmax check would be vacuous"
    );

    // 5. PyTorch: strict load of the export, logits on the same images.
    Tensor::write_safetensors(&[("input", &images)], dir.join("input.safetensors")).unwrap();
    run_python(dir);
    let torch_logits = read_one(&dir.join("torch_logits.safetensors"), "logits");
    let diff = tolerance::relative_max(&torch_logits, &rust_logits, 1.0);
    assert!(diff < TOL, "PyTorch logits differ from cvdist's by {diff:e}");
    assert_eq!(argmax(&torch_logits), rust_pred, "PyTorch predictions differ");
    assert_eq!(confusion_of(&labels, &argmax(&torch_logits)), report.confusion);

    // 6. `import` PyTorch's state_dict (with num_batches_tracked) back.
    let warm = dir.join("warm");
    run_ok(
        worker()
            .args(["import", "--model", MODEL, "--weights"])
            .arg(dir.join("torch_state.safetensors"))
            .arg("--out")
            .arg(&warm),
    );
    let warm_ckpt = warm.join("ckpt-e0000-s000000.json");
    let imported = cvdist_worker::train::checkpoint::load(&warm_ckpt).unwrap();
    assert_eq!((imported.state.epoch, imported.state.step, imported.state.model.as_str()), (0, 0, MODEL));
    assert!(imported.momentum.is_empty());
    let original = cvdist_worker::train::checkpoint::load(&ckpt).unwrap();
    assert_eq!(imported.model.len(), original.model.len());
    for (name, t) in &imported.model {
        let (_, o) = original.model.iter().find(|(n, _)| n == name).unwrap();
        assert!(t.equal(o), "{name} changed in the round trip");
    }
    let reloaded = eval::load_model(&warm_ckpt, Device::Cpu).unwrap();
    let back_logits = eval::logits(reloaded.model.as_ref(), &images, Device::Cpu);
    let diff = tolerance::relative_max(&torch_logits, &back_logits, 1.0);
    assert!(diff < TOL, "imported model's logits differ from PyTorch's by {diff:e}");
    assert_eq!(max_abs_diff(&back_logits, &rust_logits), 0.0, "identical weights, different logits");

    // 7. Warm start from the imported checkpoint: resumes at its epoch 0 and trains.
    let ft = dir.join("ft");
    run_ok(worker().args(train_args(&ft, 64)).arg("--resume").arg(&warm_ckpt));
    let ft_metrics = cvdist_common::run_dir::read_metrics(&ft).unwrap();
    assert_eq!(ft_metrics.len(), 1);
    assert_eq!(ft_metrics[0].epoch, 0);

    // 8. Errors are one clear line.
    run_err(worker().args(["eval", "--dataset", "synthetic", "--checkpoint"]).arg(dir.join("nope.json")), "nope.json");
    run_err(worker().args(["eval", "--checkpoint"]).arg(&ckpt), "--data");
    run_err(
        worker()
            .args(["import", "--model", "resnet32", "--out"])
            .arg(dir.join("x"))
            .arg("--weights")
            .arg(dir.join("torch_state.safetensors")),
        "missing tensor \"layer1.3.bn1.bias\"",
    );
    run_err(
        worker()
            .args(["import", "--model", "resnet99", "--out"])
            .arg(dir.join("x"))
            .arg("--weights")
            .arg(dir.join("torch_state.safetensors")),
        "unknown model",
    );
    let mut bytes = std::fs::read(ckpt.with_extension("safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(ckpt.with_extension("safetensors"), &bytes).unwrap();
    run_err(
        worker().args(["export", "--out"]).arg(dir.join("y.safetensors")).arg("--checkpoint").arg(&ckpt),
        "corrupt",
    );
}
