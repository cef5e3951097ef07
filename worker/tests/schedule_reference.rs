//! The learning-rate schedule against an independent computation: PyTorch's `LinearLR`
//! (Goyal et al.'s per-step warmup to lr × workers) followed by `CosineAnnealingLR` in a
//! `SequentialLR`, run by tests/python/schedule_reference.py, compared step by step for
//! several (epochs, warmup epochs, world size, steps per epoch) combinations — including
//! short warmups with one step per epoch, whose ramp must still reach the peak.
//!
//! Needs a Python with torch: $CVDIST_PYTHON (set by scripts/env.sh), else `python3`.

use cvdist_worker::train::schedule::learning_rate;
use std::path::Path;
use std::process::Command;

/// (base lr, epochs, warmup epochs, world size with --scale-lr, steps per epoch)
const CASES: &[(f64, u32, u32, u32, u64)] = &[
    (0.1, 5, 2, 2, 1),   // must reach peak 0.2, not [0.1, 0.15, 0.1309, 0.0691, 0.0191]
    (0.1, 2, 1, 2, 1),   // must reach peak 0.2, not [0.1, 0.1]
    (0.1, 5, 2, 1, 3),   // one worker: warmup from lr to lr, then cosine over 3 epochs
    (0.05, 10, 3, 4, 7), // several steps per epoch: the ramp is per step
    (0.1, 6, 1, 8, 13),
    (0.2, 12, 5, 16, 2),
    (0.1, 4, 0, 3, 5), // no warmup: the scaled rate from the first step, cosine per epoch
    (0.1, 200, 5, 4, 98),
];

fn reference() -> Vec<Vec<f64>> {
    let py = std::env::var("CVDIST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/schedule_reference.py");
    let cases: Vec<String> = CASES
        .iter()
        .map(|(lr, e, w, k, s)| format!(r#"{{"lr":{lr},"epochs":{e},"warmup":{w},"world":{k},"steps":{s}}}"#))
        .collect();
    let out = Command::new(&py)
        .arg(&script)
        .arg(format!("[{}]", cases.join(",")))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} (set CVDIST_PYTHON, see scripts/env.sh): {e}"));
    assert!(out.status.success(), "{py} {} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the reference prints a JSON list of rate lists")
}

#[test]
fn schedule_matches_pytorch_linearlr_then_cosineannealinglr() {
    let want = reference();
    assert_eq!(want.len(), CASES.len());
    for (&(lr, epochs, warmup, world, steps), want) in CASES.iter().zip(&want) {
        let mut got = Vec::new();
        for e in 0..epochs {
            for s in 0..steps {
                got.push(learning_rate(lr, e, epochs, s, steps, world as f64, warmup));
            }
        }
        assert_eq!(got.len(), want.len(), "case {:?}", (lr, epochs, warmup, world, steps));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1e-3),
                "case (lr {lr}, epochs {epochs}, warmup {warmup}, world {world}, steps {steps}): step {i} (epoch {}, step {}) is {g}, PyTorch says {w}",
                i as u64 / steps,
                i as u64 % steps
            );
        }
        // Goyal et al.: the peak k·lr is used, at the first step after warmup.
        let peak = lr * world as f64;
        let first_after = (warmup as u64 * steps) as usize;
        assert!((got[first_after] - peak).abs() < 1e-12, "peak {peak} not reached: {}", got[first_after]);
    }
}
