//! SGD with momentum and L2 weight decay, written out rather than using tch's optimizer
//! wrapper because checkpoints must hold the momentum buffers, which libtorch's C++
//! optimizer does not expose through tch. The update follows `torch.optim.SGD`
//! (dampening 0, no Nesterov) operation for operation, so results match PyTorch:
//!
//! ```text
//! d = grad + wd * p;  buf = d (first step) else momentum * buf + d;  p -= lr * buf
//! ```

use super::buckets::{BucketError, Buckets, BUCKET_ELEMS};
use tch::Tensor;

pub struct Sgd {
    /// Trainable parameters in a fixed (name-sorted) order shared by every rank.
    params: Vec<(String, Tensor)>,
    /// The parameters and their gradients, as views into one flat buffer each: the update
    /// is a few operations over all of them instead of a few per parameter.
    buckets: Buckets,
    /// One flat buffer laid out like [`Buckets::all_values`]; absent before the first step
    /// (torch.optim.SGD creates the buffer from the first gradient).
    momentum_buffers: Option<Tensor>,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    /// Moves `params` into flat buckets of at most [`BUCKET_ELEMS`] elements (see
    /// [`Buckets::new`] for what that does to them and its errors).
    pub fn new(params: Vec<(String, Tensor)>, momentum: f64, weight_decay: f64) -> Result<Sgd, BucketError> {
        let buckets = Buckets::new(&params, BUCKET_ELEMS, BUCKET_ELEMS)?;
        Ok(Sgd { params, buckets, momentum_buffers: None, momentum, weight_decay })
    }

    /// As [`Sgd::new`], with buckets already made over `params` (in any order, e.g. the
    /// gradient-ready order of [`Buckets::in_order`]); `params` keeps its own order.
    pub fn with_buckets(params: Vec<(String, Tensor)>, buckets: Buckets, momentum: f64, weight_decay: f64) -> Sgd {
        Sgd { params, buckets, momentum_buffers: None, momentum, weight_decay }
    }

    /// The flat buffers the parameters and gradients live in.
    pub fn buckets(&self) -> &Buckets {
        &self.buckets
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The flat buffers the parameters and gradients live in (the all-reduce sums them).
    pub fn buckets_mut(&mut self) -> &mut Buckets {
        &mut self.buckets
    }

    /// Zeroes every gradient: one kernel.
    pub fn zero_grad(&mut self) {
        self.buckets.zero_grads();
    }

    pub fn step(&mut self, lr: f64) {
        // A 0-dim factor lets `addcmul_` fold weight decay into the gradient in one pass
        // with no temporary. The final `p -= lr * buf` stays a multiply then a subtract:
        // a fused version rounds differently and measurably widened the gap between 1 ×
        // 2b and 2 × b training (worker/tests/equivalence.rs). Every operation is
        // elementwise, so running it over all parameters at once (the buckets are parts of
        // one flat buffer) gives each element exactly what a per-parameter loop gives, in
        // four kernels whatever the model.
        let wd = Tensor::from(self.weight_decay as f32);
        tch::no_grad(|| {
            let mut p = self.buckets.all_values();
            // In place on the gradient: it is consumed here and cleared before the next
            // backward, exactly as torch.optim.SGD's out-of-place `add` would be.
            let mut d = self.buckets.all_grads();
            if self.weight_decay != 0.0 {
                let _ = d.addcmul_(&p, &wd);
            }
            let update = match self.momentum_buffers.as_mut() {
                Some(buf) => {
                    let _ = buf.g_mul_scalar_(self.momentum).g_add_(&d);
                    buf.shallow_clone()
                }
                None if self.momentum != 0.0 => {
                    let buf = d.detach().copy();
                    self.momentum_buffers = Some(buf.shallow_clone());
                    buf
                }
                None => d,
            };
            let _ = p.g_sub_(&(update * lr));
        });
    }

    /// Momentum buffers by parameter name, for checkpoints (absent before the first step):
    /// views into the flat buffers, with each parameter's shape and strides.
    pub fn momentum_buffers(&self) -> Vec<(String, Tensor)> {
        let Some(bufs) = &self.momentum_buffers else { return Vec::new() };
        self.params
            .iter()
            .enumerate()
            .filter_map(|(i, (name, _))| self.buckets.param_view(bufs, i).ok().map(|t| (name.clone(), t)))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::momentum_buffers`]: all of them, or none
    /// (a checkpoint from before the first step, or an imported model). Unknown names,
    /// shape mismatches and partial sets are errors because they mean the checkpoint is
    /// for another model.
    pub fn load_momentum_buffers(&mut self, saved: Vec<(String, Tensor)>) -> Result<(), String> {
        if saved.is_empty() {
            return Ok(());
        }
        let mut seen = vec![false; self.params.len()];
        let bufs = self.buckets.all_values().zeros_like();
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
            let mut dst = self.buckets.param_view(&bufs, idx).map_err(|e| e.to_string())?;
            tch::no_grad(|| dst.f_copy_(&tensor)).map_err(|e| format!("momentum buffer {name:?}: {e}"))?;
            seen[idx] = true;
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            let have = seen.iter().filter(|s| **s).count();
            return Err(format!(
                "momentum buffers for {have} of {} parameters (none for {:?}); a checkpoint holds all or none",
                self.params.len(),
                self.params[missing].0
            ));
        }
        self.momentum_buffers = Some(bufs);
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
            let mut sgd = Sgd::new(vec![("w".into(), p.shallow_clone())], MOMENTUM, WD).unwrap();
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

    /// Saved momentum restores into the flat buffers (a resumed run continues exactly);
    /// a set that covers only some parameters is refused.
    #[test]
    fn momentum_round_trips_and_partial_sets_are_refused() {
        let make = || {
            let a = Tensor::linspace(-1.0, 1.0, 6, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let b = Tensor::linspace(2.0, 3.0, 4, (Kind::Float, Device::Cpu)).view([2, 2]).set_requires_grad(true);
            let params = vec![("a".to_string(), a.shallow_clone()), ("b".to_string(), b.shallow_clone())];
            (Sgd::new(params, MOMENTUM, WD).unwrap(), a, b)
        };
        let (mut one, a, b) = make();
        one.zero_grad();
        ((&a * 3.0).sum(Kind::Float) + (&b * &b).sum(Kind::Float)).backward();
        one.step(0.1);
        let live = one.momentum_buffers();
        let gap = live[1].1.data_ptr() as usize - live[0].1.data_ptr() as usize;
        assert_eq!(gap, 6 * 4, "both parameters' momentum are parts of one flat buffer");
        let saved: Vec<(String, Tensor)> = one.momentum_buffers().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let (mut two, _, _) = make();
        assert!(two.momentum_buffers().is_empty(), "no buffers before the first step");
        two.load_momentum_buffers(saved.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()).unwrap();
        for ((n1, t1), (n2, t2)) in saved.iter().zip(two.momentum_buffers()) {
            assert_eq!(n1, &n2);
            assert_eq!(values(t1), values(&t2));
        }
        let (mut three, _, _) = make();
        let err = three.load_momentum_buffers(vec![(saved[0].0.clone(), saved[0].1.shallow_clone())]).unwrap_err();
        assert!(err.contains("1 of 2 parameters"), "{err}");
        let err = three.load_momentum_buffers(vec![("zz".into(), saved[0].1.shallow_clone())]).unwrap_err();
        assert!(err.contains("unknown parameter \"zz\""), "{err}");
    }
}
