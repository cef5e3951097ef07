//! Learning-rate warmup end to end: the rates real workers train with,
//! as recorded per epoch in metrics.jsonl by `cvdist local`, for the cases below. With
//! one step per epoch an epoch's recorded rate is the rate of its only step.
//! (The schedule itself is compared with PyTorch in worker/tests/schedule_reference.rs.)

mod cluster;

use cluster::{cvdist_bin, local_on_cpu};
use cvdist_common::run_dir;
use std::process::Command;

/// Per-epoch learning rates of a 2-worker `cvdist local` run with one step per epoch.
fn rates(epochs: u32, extra: &[&str]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = local_on_cpu()
        .args(["--workers", "2", "--train-samples", "32", "--test-samples", "32", "--batch-size", "16", "--lr", "0.1"])
        .args(["--epochs", &epochs.to_string(), "--quiet", "--out"])
        .arg(&out_dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    run_dir::read_metrics(&out_dir).unwrap().iter().map(|m| m.lr).collect()
}

fn assert_rates(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "rates {got:?}, want {want:?}");
    }
}

#[test]
fn two_warmup_epochs_reach_the_scaled_peak_and_the_cosine_starts_there() {
    // Before: [0.1, 0.15, 0.1309, 0.0691, 0.0191], the peak 0.2 never used.
    assert_rates(&rates(5, &["--scale-lr", "--warmup-epochs", "2"]), &[0.1, 0.15, 0.2, 0.15, 0.05]);
}

#[test]
fn one_warmup_epoch_of_two_reaches_the_peak() {
    // Before: [0.1, 0.1].
    assert_rates(&rates(2, &["--scale-lr", "--warmup-epochs", "1"]), &[0.1, 0.2]);
}

#[test]
fn warmup_without_scale_lr_is_refused_in_one_line() {
    // Before: accepted, and the rate held flat at 0.1 through the "warmup".
    let out = Command::new(cvdist_bin())
        .args(["local", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "5", "--warmup-epochs", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "error: --warmup-epochs 2 needs --scale-lr: warmup ramps from --lr up to lr × workers (Goyal et al. 2017), and without scaling there is no higher rate to ramp to"
    );
}
