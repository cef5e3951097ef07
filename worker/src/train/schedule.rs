//! Learning-rate schedule: cosine annealing stepped per epoch (as the reference recipe
//! steps `CosineAnnealingLR` once per epoch), with optional linear scaling and warmup for
//! large global batches (Goyal et al.: lr × world size, ramped up linearly).

/// Learning rate for `epoch` (0-based) of `epochs`, at `step` of `steps_per_epoch` —
/// the step only matters during warmup, which ramps per step to avoid a jump at epoch 1.
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
    if warmup_epochs > 0 && epoch < warmup_epochs {
        let done = epoch as f64 + step as f64 / steps_per_epoch.max(1) as f64;
        let frac = done / warmup_epochs as f64;
        // Start from the unscaled rate: that is the rate the single-worker recipe uses.
        return base_lr + (peak - base_lr) * frac;
    }
    let t = epoch as f64 / epochs.max(1) as f64;
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

    #[test]
    fn warmup_ramps_to_the_scaled_rate() {
        let start = learning_rate(0.1, 0, 10, 0, 100, 4.0, 2);
        let mid = learning_rate(0.1, 1, 10, 0, 100, 4.0, 2);
        assert!((start - 0.1).abs() < 1e-12);
        assert!((mid - 0.25).abs() < 1e-12);
        assert!(learning_rate(0.1, 2, 10, 0, 100, 4.0, 2) < 0.4);
    }
}
