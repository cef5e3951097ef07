//! SGD with momentum and L2 weight decay, written out rather than using tch's optimizer
//! wrapper because checkpoints must hold the momentum buffers, which libtorch's C++
//! optimizer does not expose through tch. The update follows `torch.optim.SGD`
//! (dampening 0, no Nesterov) operation for operation, so results match PyTorch:
//!
//! ```text
//! d = grad + wd * p;  buf = d (first step) else momentum * buf + d;  p -= lr * buf
//! ```

use tch::Tensor;

pub struct Sgd {
    /// Trainable parameters in a fixed (name-sorted) order shared by every rank.
    params: Vec<(String, Tensor)>,
    momentum_buffers: Vec<Option<Tensor>>,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    pub fn new(params: Vec<(String, Tensor)>, momentum: f64, weight_decay: f64) -> Sgd {
        let n = params.len();
        Sgd { params, momentum_buffers: (0..n).map(|_| None).collect(), momentum, weight_decay }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    pub fn step(&mut self, lr: f64) {
        // A 0-dim factor lets `addcmul_` fold weight decay into the gradient in one pass
        // with no temporary. The final `p -= lr * buf` stays a multiply then a subtract:
        // a fused version rounds differently and measurably widened the gap between 1 ×
        // 2b and 2 × b training (worker/tests/equivalence.rs).
        let wd = Tensor::from(self.weight_decay as f32);
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(self.momentum_buffers.iter_mut()) {
                let mut d = p.grad();
                if !d.defined() {
                    continue;
                }
                // In place on the gradient: it is consumed here and cleared before the
                // next backward, exactly as torch.optim.SGD's out-of-place `add` would be.
                if self.weight_decay != 0.0 {
                    let _ = d.addcmul_(p, &wd);
                }
                let update = match buf {
                    Some(b) => {
                        let _ = b.g_mul_scalar_(self.momentum).g_add_(&d);
                        b.shallow_clone()
                    }
                    None if self.momentum != 0.0 => {
                        let b = d.detach().copy();
                        *buf = Some(b.shallow_clone());
                        b
                    }
                    None => d,
                };
                let _ = p.g_sub_(&(update * lr));
            }
        });
    }

    /// Momentum buffers by parameter name, for checkpoints (absent before the first step).
    pub fn momentum_buffers(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.momentum_buffers)
            .filter_map(|((name, _), b)| b.as_ref().map(|b| (name.clone(), b.shallow_clone())))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::momentum_buffers`]; unknown names or
    /// shape mismatches are errors because they mean the checkpoint is for another model.
    pub fn load_momentum_buffers(&mut self, saved: Vec<(String, Tensor)>) -> Result<(), String> {
        for (name, tensor) in saved {
            let idx = self
                .params
                .iter()
                .position(|(n, _)| *n == name)
                .ok_or_else(|| format!("momentum buffer for unknown parameter {name:?}"))?;
            let p = &self.params[idx].1;
            if p.size() != tensor.size() {
                return Err(format!(
                    "momentum buffer {name:?} has shape {:?}, parameter has {:?}",
                    tensor.size(),
                    p.size()
                ));
            }
            self.momentum_buffers[idx] = Some(tensor.to_device(p.device()).to_kind(p.kind()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    const MOMENTUM: f64 = 0.9;
    const WD: f64 = 5e-4;

    /// The torch.optim.SGD recurrence in f64: returns (parameters, momentum buffer).
    fn reference(p0: &[f64], steps: &[(Vec<f64>, f64)]) -> (Vec<f64>, Vec<f64>) {
        let mut p = p0.to_vec();
        let mut buf: Option<Vec<f64>> = None;
        for (g, lr) in steps {
            let d: Vec<f64> = g.iter().zip(&p).map(|(g, p)| g + WD * p).collect();
            let b: Vec<f64> = match buf.take() {
                Some(b) => b.iter().zip(&d).map(|(b, d)| MOMENTUM * b + d).collect(),
                None => d,
            };
            p.iter_mut().zip(&b).for_each(|(p, b)| *p -= lr * b);
            buf = Some(b);
        }
        (p, buf.unwrap_or_default())
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().view([-1])).expect("f64 values")
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{what} element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn steps_follow_torch_optim_sgd_for_contiguous_and_channels_last_parameters() {
        for channels_last in [false, true] {
            let init = Tensor::linspace(-1.0, 1.0, 48, (Kind::Float, Device::Cpu)).view([2, 3, 2, 4]);
            let data = if channels_last { init.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]) } else { init };
            let p = data.set_requires_grad(true);
            let p0 = values(&p);
            let mut sgd = Sgd::new(vec![("w".into(), p.shallow_clone())], MOMENTUM, WD);
            let mut steps = Vec::new();
            for (k, lr) in [0.1, 0.05, 0.02].into_iter().enumerate() {
                sgd.zero_grad();
                // d(sum(p * c))/dp = c: a known gradient, different every step.
                let c =
                    Tensor::linspace(0.5, -0.3 * (k as f64 + 1.0), 48, (Kind::Float, Device::Cpu)).view([2, 3, 2, 4]);
                (&p * &c).sum(Kind::Float).backward();
                sgd.step(lr);
                steps.push((values(&c), lr));
            }
            let (want_p, want_buf) = reference(&p0, &steps);
            assert_close(&format!("parameters (channels_last={channels_last})"), &values(&p), &want_p);
            let saved = sgd.momentum_buffers();
            assert_eq!(saved.len(), 1);
            assert_close(&format!("momentum (channels_last={channels_last})"), &values(&saved[0].1), &want_buf);
        }
    }
}
