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
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(self.momentum_buffers.iter_mut()) {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let d = if self.weight_decay != 0.0 { grad.g_add(&(&*p * self.weight_decay)) } else { grad };
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
                return Err(format!("momentum buffer {name:?} has shape {:?}, parameter has {:?}", tensor.size(), p.size()));
            }
            self.momentum_buffers[idx] = Some(tensor.to_device(p.device()).to_kind(p.kind()));
        }
        Ok(())
    }
}
