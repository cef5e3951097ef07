//! Learning-rate schedule.
//!
//! Without warmup: cosine annealing stepped per epoch, as the reference CIFAR recipe steps
//! `CosineAnnealingLR(T_max = epochs)` once per epoch: `lr(e) = ½·peak·(1 + cos(π·e/E))`.
//!
//! With `--scale-lr` and `--warmup-epochs W`, the gradual warmup of Goyal et al. (2017),
//! "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.2: with k workers the
//! peak rate is `k·lr` (linear scaling rule); it is reached by a linear ramp, one increment
//! per step, from `lr` (the single-worker rate) at the first step to `k·lr` at the first
//! step after W epochs, and from there the cosine runs from the peak over the remaining
//! `E − W` epochs (Goyal et al. decay in steps; the cosine keeps this project's recipe):
//!
//! ```text
//! step i of W·S warmup steps:  lr + (k·lr − lr) · i / (W·S)
//! epoch e ≥ W:                 ½·k·lr·(1 + cos(π·(e − W)/(E − W)))
//! ```
//!
//! This is exactly PyTorch's `SequentialLR([LinearLR(start_factor=1/k, total_iters=W·S),
//! CosineAnnealingLR(T_max=E−W)], milestones=[W·S])` on an optimizer at `k·lr`, stepped
//! after every step during warmup and after every epoch afterwards — the independent
//! computation `worker/tests/schedule_reference.rs` compares against.
//!
//! Warmup without `--scale-lr` is refused when the job is submitted (`spec::validate`):
//! the ramp's target is the scaled rate, and without scaling there is nothing to ramp to.
//! (A record stored before that rule gets a flat warmup at `lr`, then the cosine.)

/// Learning rate for `step` (0-based, of `steps_per_epoch`) of `epoch` (0-based, of
/// `epochs`), with `scale` = k (the world size with `--scale-lr`, else 1) and
/// `warmup_epochs` = W (smaller than `epochs`, as validated).
pub fn learning_rate(
    base_lr: f64,
    epoch: u32,
    epochs: u32,
    step: u64,
    steps_per_epoch: u64,
    scale: f64,
    warmup_epochs: u32,
) -> f64 {
    let peak = base_lr * scale;
    // A warmup as long as the run would leave no cosine; validation refuses it, and this
    // keeps the formula finite for any input.
    let warmup = warmup_epochs.min(epochs.saturating_sub(1));
    if warmup > 0 && epoch < warmup {
        let per_epoch = steps_per_epoch.max(1);
        let done = epoch as u64 * per_epoch + step.min(per_epoch);
        let total = warmup as u64 * per_epoch;
        return base_lr + (peak - base_lr) * done as f64 / total as f64;
    }
    let t = (epoch - warmup) as f64 / (epochs - warmup).max(1) as f64;
    0.5 * peak * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_reference_formula() {
        // lr(e) = 0.05 (1 + cos(pi e / E)) for base 0.1
        for e in 0..200 {
            let want = 0.05 * (1.0 + (std::f64::consts::PI * e as f64 / 200.0).cos());
            assert!((learning_rate(0.1, e, 200, 0, 391, 1.0, 0) - want).abs() < 1e-15);
        }
        assert_eq!(learning_rate(0.1, 0, 5, 0, 10, 1.0, 0), 0.1);
    }

    /// The rate of each epoch with one step per epoch, where a warmup that misses the peak
    /// shows most plainly.
    fn per_epoch(epochs: u32, scale: f64, warmup: u32) -> Vec<f64> {
        (0..epochs).map(|e| learning_rate(0.1, e, epochs, 0, 1, scale, warmup)).collect()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn warmup_reaches_the_scaled_peak_then_cosine_starts_from_it() {
        // 2 workers, 2 warmup epochs of 5: 0.1 → 0.15 → peak 0.2, then cos over 3 epochs.
        assert_close(&per_epoch(5, 2.0, 2), &[0.1, 0.15, 0.2, 0.15, 0.05]);
        // 1 warmup epoch of 2: the second epoch runs at the peak.
        assert_close(&per_epoch(2, 2.0, 1), &[0.1, 0.2]);
    }

    #[test]
    fn warmup_ramps_once_per_step() {
        // 4 workers, 2 warmup epochs of 100 steps: +0.3/200 per step from 0.1.
        assert!((learning_rate(0.1, 0, 10, 0, 100, 4.0, 2) - 0.1).abs() < 1e-12);
        assert!((learning_rate(0.1, 0, 10, 50, 100, 4.0, 2) - 0.175).abs() < 1e-12);
        assert!((learning_rate(0.1, 1, 10, 0, 100, 4.0, 2) - 0.25).abs() < 1e-12);
        assert!((learning_rate(0.1, 1, 10, 99, 100, 4.0, 2) - (0.1 + 0.3 * 199.0 / 200.0)).abs() < 1e-12);
        assert!((learning_rate(0.1, 2, 10, 0, 100, 4.0, 2) - 0.4).abs() < 1e-12);
    }
}
