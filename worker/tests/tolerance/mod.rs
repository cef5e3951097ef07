//! How far two float32 computations of the same quantity may drift apart when they differ only
//! in the order of accumulation: another SIMD width (AVX2 vs AVX-512, Intel vs AMD kernels in
//! oneDNN/MKL), another split of a batch over ranks, another reduction tree.
//!
//! The rounding error of a float32 sum of n terms is bounded by about n·ε·Σ|terms| (Higham,
//! *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2): it scales with the
//! magnitudes that were accumulated, not with the result, which may have cancelled to almost
//! nothing. So every comparison here is relative to the scale of the compared quantity, but
//! never to a scale below a floor that stands for the magnitude of what it was computed from.
//! Without the floor a near-zero tensor (a BatchNorm bias that started at 0) fails a relative
//! bound on one CPU and passes on another; without the relative part a large tensor's normal
//! rounding would fail an absolute bound tuned to small ones.
#![allow(dead_code)] // each test binary uses the part it needs

use tch::Tensor;

/// float32 unit roundoff, 2⁻²⁴ (IEEE 754 binary32).
pub const F32_UNIT_ROUNDOFF: f64 = 5.960_464_477_539_063e-8;

/// `‖a − b‖₂ / max(‖a‖₂, floor)`: the relative error of `b` against `a` with an absolute floor
/// on the scale. `floor` is a norm (same unit as `‖a‖₂`); must be > 0.
pub fn relative_l2(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    assert_eq!(a.size(), b.size(), "compared tensors differ in shape");
    assert!(floor > 0.0, "a floor of {floor} makes a relative error meaningless");
    let diff = (a - b).norm().double_value(&[]);
    diff / a.norm().double_value(&[]).max(floor)
}

/// `max|a − b| / max(max|a|, floor)`: the elementwise analogue of [`relative_l2`], for outputs
/// such as logits where every element matters on its own. `floor` is in the unit of the elements.
pub fn relative_max(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    assert_eq!(a.size(), b.size(), "compared tensors differ in shape");
    assert!(floor > 0.0, "a floor of {floor} makes a relative error meaningless");
    let diff = (a - b).abs().max().double_value(&[]);
    diff / a.abs().max().double_value(&[]).max(floor)
}

/// Root mean square of every element of `tensors` taken together: the typical magnitude of a
/// model's parameters, used to build per-tensor floors (`rms · √numel` is the norm a tensor of
/// that size would have at the model's typical scale).
pub fn rms(tensors: &[&Tensor]) -> f64 {
    let (mut sq, mut n) = (0.0f64, 0i64);
    for t in tensors {
        sq += t.square().sum(tch::Kind::Double).double_value(&[]);
        n += t.numel() as i64;
    }
    (sq / n.max(1) as f64).sqrt()
}
