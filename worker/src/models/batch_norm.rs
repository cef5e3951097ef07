//! BatchNorm2d, and its SyncBatchNorm form while a step runs under
//! [`crate::train::sync_bn::with_group`] (`--sync-bn`).
//!
//! Outside a group (evaluation, single-rank runs without `--sync-bn`) it is libtorch's
//! `batch_norm`, exactly `torch.nn.BatchNorm2d`. In training mode inside a group it
//! normalises over the whole global batch, as `torch.nn.SyncBatchNorm`: the per-channel
//! Σx, Σx² and sample count are summed over the ranks (one differentiable all-reduce of
//! 2C + 1 floats in forward, one of the same size in backward), the biased variance
//! normalises, and the running statistics are updated once from the global moments with
//! the unbiased variance (`running_var ← (1 − m)·running_var + m·var·n/(n − 1)`), so every
//! rank holds the same statistics. The moments are summed in f32; the variance is
//! E[x²] − E[x]², clamped at 0 (its rounding is relative to E[x²], which for the
//! normalised activations of these models is within a small factor of the variance).

use crate::train::sync_bn;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// PyTorch's defaults (torch.nn.BatchNorm2d).
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// BatchNorm over the channels of NCHW input: γ = `weight`, β = `bias`, running statistics
/// `running_mean`/`running_var` (the state-dict names of torch.nn.BatchNorm2d).
#[derive(Debug)]
pub struct BatchNorm2d {
    inner: nn::BatchNorm,
}

/// BatchNorm2d as PyTorch creates it: γ=1, β=0, eps 1e-5, momentum 0.1, running stats 0/1.
/// libtorch's batch_norm normalises with the biased batch variance and folds the unbiased one
/// into running_var, exactly as torch.nn.BatchNorm2d does. There is no num_batches_tracked:
/// it only matters for momentum=None, which PyTorch's default does not use.
pub fn batch_norm2d(vs: nn::Path, c: i64) -> BatchNorm2d {
    let cfg = nn::BatchNormConfig {
        eps: EPS,
        momentum: MOMENTUM,
        affine: true,
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    BatchNorm2d { inner: nn::batch_norm2d(vs, c, cfg) }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train && sync_bn::active() {
            if let Some(ys) = self.synced(xs) {
                return ys;
            }
        }
        self.inner.forward_t(xs, train)
    }
}

impl BatchNorm2d {
    /// The SyncBatchNorm forward; None when libtorch refused the group sum (the layer then
    /// normalises over this rank's batch, and the pass reports the failure).
    fn synced(&self, xs: &Tensor) -> Option<Tensor> {
        let c = xs.size().get(1).copied().unwrap_or(0);
        let x = xs.to_kind(Kind::Float);
        let local_n = (x.numel() as i64 / c.max(1)) as f64;
        let dims: &[i64] = &[0, 2, 3];
        let sum = x.sum_dim_intlist(dims, false, Kind::Float);
        let sum_sq = (&x * &x).sum_dim_intlist(dims, false, Kind::Float);
        let count = Tensor::full([1], local_n, (Kind::Float, x.device()));
        let packed = Tensor::cat(&[sum, sum_sq, count], 0);
        let total = match sync_bn::group_sum(&packed)? {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "SyncBatchNorm group sum refused; this layer normalises over the local batch");
                return None;
            }
        };
        let n = total.narrow(0, 2 * c, 1);
        let mean = total.narrow(0, 0, c) / &n;
        let var = (total.narrow(0, c, c) / &n - &mean * &mean).clamp_min(0.0);
        let shape = [1, c, 1, 1];
        let scale = (&var + EPS).rsqrt();
        let scale = match &self.inner.ws {
            Some(w) => scale * w,
            None => scale,
        };
        let mut ys = (&x - mean.view(shape)) * scale.view(shape);
        if let Some(b) = &self.inner.bs {
            ys += b.view(shape);
        }
        tch::no_grad(|| {
            let unbiased = var.detach() * (&n / (&n - 1.0).clamp_min(1.0));
            let mut rm = self.inner.running_mean.shallow_clone();
            let mut rv = self.inner.running_var.shallow_clone();
            rm.copy_(&(&rm * (1.0 - MOMENTUM) + mean.detach() * MOMENTUM));
            rv.copy_(&(&rv * (1.0 - MOMENTUM) + unbiased * MOMENTUM));
        });
        Some(ys.to_kind(xs.kind()))
    }
}
