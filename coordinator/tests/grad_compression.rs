//! `--grad-compression` end to end: real `cvdist local` runs with two
//! worker processes on a real TCP ring. The numerical claims (rounding bound, identical
//! ranks, bytes on the wire, fp16 overflow) are tested on the ring itself in
//! `worker/tests/grad_compression.rs`.

mod cluster;

use cluster::local_on_cpu;
use cvdist_common::proto::JobSpec;
use cvdist_common::run_dir;
use std::path::Path;

/// A tiny 2-worker resnet20 run on synthetic data with `--grad-compression <c>`; returns
/// the per-epoch train losses and the text of both workers' logs.
fn local_run(dir: &Path, c: &str) -> (Vec<cvdist_common::proto::EpochMetrics>, String) {
    local_run_on(dir, c, "ring")
}

/// [`local_run`] with `--collective <collective>`.
fn local_run_on(dir: &Path, c: &str, collective: &str) -> (Vec<cvdist_common::proto::EpochMetrics>, String) {
    let out_dir = dir.join(format!("run-{c}-{collective}"));
    let out = local_on_cpu()
        .args(["--workers", "2", "--train-samples", "64", "--test-samples", "32"])
        .args(["--batch-size", "16", "--epochs", "2", "--no-augment", "--quiet", "--grad-compression", c])
        .args(["--collective", collective, "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let mut logs = String::new();
    for k in 0..2 {
        logs.push_str(&std::fs::read_to_string(out_dir.join(format!("worker-{k}.log"))).unwrap_or_default());
    }
    assert!(out.status.success(), "{}\n{}\n{logs}", out.status, String::from_utf8_lossy(&out.stderr));
    // The run directory's job.json is the spec as submitted: it records the choice.
    let spec: JobSpec = serde_json::from_slice(&std::fs::read(out_dir.join(run_dir::JOB_FILE)).unwrap()).unwrap();
    assert_eq!(spec.grad_compression, c);
    (run_dir::read_metrics(&out_dir).unwrap(), logs)
}

/// bf16 trains (finite losses, every epoch recorded), the workers say that gradients
/// travel as 16-bit values, and the run is not bit-identical to `none`: the compression
/// really was on the wire, and it changes the numbers only by rounding.
#[test]
fn two_workers_train_with_a_bf16_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (bf16, logs) = local_run(dir.path(), "bf16");
    assert_eq!(bf16.len(), 2);
    for m in &bf16 {
        assert!(m.train_loss.is_finite() && m.test_loss.is_finite() && m.train_loss > 0.0, "{m:?}");
        assert_eq!(m.world_size, 2);
    }
    assert!(logs.contains("gradient buckets travel as 16-bit values"), "{logs}");
    let (none, logs) = local_run(dir.path(), "none");
    assert!(!logs.contains("16-bit"), "{logs}");
    let (a, b) = (bf16[1].train_loss, none[1].train_loss);
    assert_ne!(a, b, "bf16 and none gave bit-identical losses: was anything compressed?");
    assert!((a - b).abs() <= 0.05 * b.abs(), "bf16 loss {a} vs none {b}: more than rounding apart");
}

/// The same job on PyTorch's c10d gloo group: uncompressed it trains as the ring does (the
/// same gradients summed in another order: losses equal to float rounding), and each
/// 16-bit wire trains within rounding of it, the workers saying which group they use.
#[test]
fn two_workers_train_on_a_gloo_group_with_each_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (ring, _) = local_run(dir.path(), "none");
    let (gloo, logs) = local_run_on(dir.path(), "none", "gloo");
    assert!(logs.contains("gradients via a c10d process group") && logs.contains("backend=gloo"), "{logs}");
    for (a, b) in gloo.iter().zip(&ring) {
        assert_eq!(a.world_size, 2);
        let (x, y) = (a.train_loss, b.train_loss);
        assert!((x - y).abs() <= 1e-4 * y.abs(), "gloo loss {x} vs ring {y}: more than summation order apart");
    }
    for wire in ["bf16", "fp16"] {
        let (m, logs) = local_run_on(dir.path(), wire, "gloo");
        assert!(logs.contains("gradient buckets travel as 16-bit values"), "{logs}");
        let (x, y) = (m[1].train_loss, gloo[1].train_loss);
        assert!(x.is_finite() && (x - y).abs() <= 0.05 * y.abs(), "{wire} on gloo: loss {x} vs {y}");
    }
}
