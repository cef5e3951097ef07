//! Dynamic loss scaling for fp16 mixed precision, with the semantics of
//! `torch.cuda.amp.GradScaler` (PyTorch 2.x, defaults below):
//!
//! - the loss is multiplied by the scale before backward;
//! - after the gradients are averaged, ONE fused call over the flat gradient buffer
//!   (`_amp_foreach_non_finite_check_and_unscale_` via tch) divides them by the scale and
//!   records in a one-element `found_inf` tensor whether any element is inf or NaN;
//! - `_amp_update_scale_` then updates the scale and its growth tracker on the device:
//!   an overflow multiplies the scale by `BACKOFF_FACTOR` and resets the tracker; after
//!   `GROWTH_INTERVAL` consecutive clean steps the scale is multiplied by `GROWTH_FACTOR`;
//! - a step whose gradients overflowed is skipped (weights and momentum unchanged).
//!
//! There is no floor: every step is checked whatever the scale. The only host read per
//! step is the one `found_inf` value that decides whether the optimizer runs.

use tch::{Device, Kind, TchError, Tensor};

/// Initial scale (torch.cuda.amp.GradScaler's `init_scale`, 2^16).
pub const INIT_SCALE: f64 = 65536.0;
/// Scale multiplier after `GROWTH_INTERVAL` clean steps (GradScaler's `growth_factor`).
pub const GROWTH_FACTOR: f64 = 2.0;
/// Scale multiplier after an overflow (GradScaler's `backoff_factor`).
pub const BACKOFF_FACTOR: f64 = 0.5;
/// Consecutive clean steps before the scale grows (GradScaler's `growth_interval`).
pub const GROWTH_INTERVAL: i64 = 2000;

/// What a checkpoint keeps of a scaler (part of the checkpoint record in `cvdist_common`).
pub use cvdist_common::checkpoint::ScalerState;

pub struct GradScaler {
    /// One-element f32 tensors on the training device, as GradScaler keeps them.
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    pub growth_interval: i64,
}

impl GradScaler {
    pub fn new(device: Device) -> GradScaler {
        GradScaler::from_state(device, ScalerState { scale: INIT_SCALE, growth_tracker: 0 })
    }

    pub fn from_state(device: Device, state: ScalerState) -> GradScaler {
        GradScaler {
            scale: Tensor::from_slice(&[state.scale as f32]).to_device(device),
            growth_tracker: Tensor::from_slice(&[state.growth_tracker as i32]).to_device(device),
            found_inf: Tensor::zeros([1], (Kind::Float, device)),
            growth_interval: GROWTH_INTERVAL,
        }
    }

    /// Reads the scale and tracker back to the host (checkpoints, tests).
    pub fn state(&self) -> ScalerState {
        ScalerState { scale: self.scale.double_value(&[0]), growth_tracker: self.growth_tracker.int64_value(&[0]) }
    }

    /// `loss` × scale, without leaving the device.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * &self.scale
    }

    /// Divides the flat f32 gradient buffer by the scale and by `extra` (1/world size when
    /// the buffer holds summed gradients) in one fused call, and records whether any
    /// element is non-finite.
    pub fn unscale(&mut self, flat: &mut Tensor, extra: f64) -> Result<(), TchError> {
        self.unscale_all(std::slice::from_mut(flat), extra)
    }

    /// [`GradScaler::unscale`] over several flat buffers (the gradient buckets): one fused
    /// call each, all recording into the same `found_inf` (the kernel only ever sets it).
    pub fn unscale_all(&mut self, flats: &mut [Tensor], extra: f64) -> Result<(), TchError> {
        tch::no_grad(|| {
            let _ = self.found_inf.f_zero_()?;
            // As GradScaler: the reciprocal is taken in double, then rounded to f32.
            let inv = (self.scale.f_to_kind(Kind::Double)?.f_reciprocal()? * extra).f_to_kind(Kind::Float)?;
            for flat in flats {
                flat.f_internal_amp_non_finite_check_and_unscale(&mut self.found_inf, &inv)?;
            }
            Ok(())
        })
    }

    /// Updates scale and tracker from the last `unscale`; returns whether the step may be
    /// applied (false: the gradients overflowed and the step must be skipped).
    pub fn update(&mut self) -> Result<bool, TchError> {
        let overflowed = self.found_inf.f_double_value(&[0])? != 0.0;
        // Updates `scale` and `growth_tracker` in place; the returned alias is not needed.
        let _ = tch::no_grad(|| {
            self.scale.f_internal_amp_update_scale_(
                &self.growth_tracker,
                &self.found_inf,
                GROWTH_FACTOR,
                BACKOFF_FACTOR,
                self.growth_interval,
            )
        })?;
        Ok(!overflowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    /// Clean gradients are divided by scale × world; an inf or NaN anywhere is found by
    /// the single fused call, backs the scale off by half and resets the tracker.
    #[test]
    fn unscales_and_backs_off_on_inf_and_nan() {
        let mut s = GradScaler::new(Device::Cpu);
        let mut g = grads(&[65536.0, -131072.0, 0.0]);
        s.unscale(&mut g, 0.5).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![0.5, -1.0, 0.0]);
        assert!(s.update().unwrap());
        assert_eq!(s.state(), ScalerState { scale: INIT_SCALE, growth_tracker: 1 });
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let before = s.state();
            let mut g = grads(&[1.0, bad, 2.0]);
            s.unscale(&mut g, 1.0).unwrap();
            assert!(!s.update().unwrap(), "{bad} must skip the step");
            assert_eq!(s.state(), ScalerState { scale: before.scale * BACKOFF_FACTOR, growth_tracker: 0 });
        }
    }

    /// The scale grows by 2 after `growth_interval` consecutive clean steps, and an
    /// overflow in between restarts the count.
    #[test]
    fn grows_after_the_interval_and_overflow_resets_the_count() {
        let mut s = GradScaler::from_state(Device::Cpu, ScalerState { scale: 1024.0, growth_tracker: 0 });
        s.growth_interval = 3;
        let step = |s: &mut GradScaler, v: f32| {
            let mut g = grads(&[v]);
            s.unscale(&mut g, 1.0).unwrap();
            s.update().unwrap()
        };
        assert!(step(&mut s, 1.0) && step(&mut s, 1.0));
        assert!(!step(&mut s, f32::INFINITY));
        assert_eq!(s.state(), ScalerState { scale: 512.0, growth_tracker: 0 });
        assert!(step(&mut s, 1.0) && step(&mut s, 1.0));
        assert_eq!(s.state(), ScalerState { scale: 512.0, growth_tracker: 2 });
        assert!(step(&mut s, 1.0));
        assert_eq!(s.state(), ScalerState { scale: 1024.0, growth_tracker: 0 });
    }

    /// No floor: at a scale of 1.0 and below an overflow is still found and still backs
    /// off (stopping the checks at 1.0 would let an overflow at that scale through).
    #[test]
    fn checks_at_and_below_one() {
        let mut s = GradScaler::from_state(Device::Cpu, ScalerState { scale: 1.0, growth_tracker: 7 });
        let mut g = grads(&[f32::INFINITY]);
        s.unscale(&mut g, 1.0).unwrap();
        assert!(!s.update().unwrap());
        assert_eq!(s.state(), ScalerState { scale: 0.5, growth_tracker: 0 });
        let mut g = grads(&[3.0]);
        s.unscale(&mut g, 1.0).unwrap();
        assert!(s.update().unwrap());
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![6.0]);
    }
}
