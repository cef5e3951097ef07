//! Running sums of a pass over data (training epoch or evaluation), kept on the training
//! device so that a step does not wait for the device to report its loss.
//!
//! The reference arithmetic reads each batch's mean loss (f32) and correct count back and
//! adds them up on the host in f64: `loss_sum += loss as f64 * n; correct += correct as
//! f64`. [`DeviceSums`] does exactly that arithmetic on the device, in f64 tensors, with
//! one IEEE operation per host operation (f32 → f64 is exact; the product and the sum are
//! each rounded once, as on the host), so the totals are bit for bit the ones the host
//! would compute, without a device sync per step. They are read back only when a value is
//! needed: a progress line, a checkpoint, the end of the pass.

use tch::{Device, Kind, TchError, Tensor};

/// One batch's results, still on the training device (nothing has been read back).
#[derive(Debug)]
pub struct StepOutput {
    /// Mean cross-entropy of the batch: a 0-dim f32 tensor.
    pub loss: Tensor,
    /// Correctly classified samples of the batch: a 0-dim f64 tensor (an exact integer).
    pub correct: Tensor,
}

/// Σ loss·samples and Σ correct over the batches added so far, as two 0-dim f64 tensors
/// on the device.
#[derive(Debug)]
pub struct DeviceSums {
    loss: Tensor,
    correct: Tensor,
}

impl DeviceSums {
    /// Sums starting from `loss_sum` and `correct` (a resumed epoch continues the
    /// checkpoint's partial sums), on `device`.
    pub fn new(device: Device, loss_sum: f64, correct: f64) -> Result<DeviceSums, TchError> {
        Ok(DeviceSums {
            loss: Tensor::f_scalar_tensor(loss_sum, (Kind::Double, device))?,
            correct: Tensor::f_scalar_tensor(correct, (Kind::Double, device))?,
        })
    }

    /// Adds one batch of `n` samples: `loss` is its mean loss (f32 or f64, 0-dim),
    /// `correct` its correct count (any numeric kind, 0-dim). Enqueues three small kernels
    /// (two when `loss` is already f64); reads nothing back.
    pub fn add(&mut self, loss: &Tensor, correct: &Tensor, n: i64) -> Result<(), TchError> {
        // Separate multiply and add (not `add_` with alpha = n): a fused multiply-add would
        // round once where the host rounded twice.
        let term = loss.f_to_kind(Kind::Double)?.f_mul_scalar(n as f64)?;
        // New tensors rather than in-place adds (same kernels): a [`DeviceSums::snapshot`]
        // then stays what it was without a copy.
        self.loss = self.loss.f_add(&term)?;
        self.correct = self.correct.f_add(&correct.f_to_kind(Kind::Double)?)?;
        Ok(())
    }

    /// The sums as they are now, (Σ loss·samples, Σ correct) as 0-dim f64 device tensors
    /// that later [`DeviceSums::add`]s do not change; costs no kernel and reads nothing.
    pub fn snapshot(&self) -> (Tensor, Tensor) {
        (self.loss.shallow_clone(), self.correct.shallow_clone())
    }

    /// (Σ loss·samples, Σ correct), read back to the host in one copy: waits for the
    /// device to finish the batches added so far.
    pub fn read(&self) -> Result<(f64, f64), TchError> {
        let both = Tensor::f_stack(&[&self.loss, &self.correct], 0)?.f_to_device(Device::Cpu)?;
        let v = Vec::<f64>::try_from(&both)?;
        match v[..] {
            [loss, correct] => Ok((loss, correct)),
            _ => Err(TchError::Shape(format!("device sums read back {} values, not 2", v.len()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-batch values that exercise rounding: losses with full f32 mantissas, odd batch
    /// sizes (the last batch of an epoch), large and tiny magnitudes, a resumed start.
    #[test]
    fn device_sums_equal_the_host_arithmetic_bit_for_bit() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            // xorshift64*: a fixed, dependency-free sequence.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let (start_loss, start_correct) = (1_234.567_890_123_4_f64, 777.0);
        let mut sums = DeviceSums::new(Device::Cpu, start_loss, start_correct).unwrap();
        let (mut host_loss, mut host_correct) = (start_loss, start_correct);
        for step in 0..5000 {
            let r = next();
            let mantissa = (r >> 40) as f32 / (1u64 << 24) as f32;
            let loss = match step % 4 {
                0 => std::f32::consts::LN_10 * (1.0 + mantissa),
                1 => mantissa * 1e-6,
                2 => mantissa * 1e4,
                _ => f32::from_bits(0x3f80_0000 | (r as u32 & 0x007f_ffff)),
            };
            let n = [128i64, 100, 97, 1, 16][step % 5];
            let correct = (r % (n as u64 + 1)) as i64;
            sums.add(&Tensor::from(loss), &Tensor::from(correct), n).unwrap();
            host_loss += loss as f64 * n as f64;
            host_correct += correct as f64;
        }
        let (l, c) = sums.read().unwrap();
        assert_eq!(l.to_bits(), host_loss.to_bits(), "{l} vs {host_loss}");
        assert_eq!(c.to_bits(), host_correct.to_bits(), "{c} vs {host_correct}");
    }

    /// A non-finite loss makes the sum non-finite, as it did on the host.
    #[test]
    fn a_nan_loss_propagates() {
        let mut sums = DeviceSums::new(Device::Cpu, 0.0, 0.0).unwrap();
        sums.add(&Tensor::from(1.5f32), &Tensor::from(3i64), 4).unwrap();
        sums.add(&Tensor::from(f32::NAN), &Tensor::from(0i64), 4).unwrap();
        let (l, c) = sums.read().unwrap();
        assert!(l.is_nan());
        assert_eq!(c, 3.0);
    }
}
