//! Layers created with PyTorch's default initialisation, plus the multiply-add counter that
//! `models::info` uses.
//!
//! tch's own defaults differ from PyTorch's (Kaiming gain √2 instead of √(1/3), zero conv
//! bias, BN γ ~ U(0,1)), and a port that is meant to reproduce PyTorch training curves
//! must start from the same distribution, so every layer of the zoo is built here.

use std::cell::Cell;
use tch::nn::{self, Module};
use tch::Tensor;

thread_local! {
    // Per thread so concurrent forwards (e.g. parallel tests) cannot pollute one another's count.
    static MAC_COUNTER: Cell<Option<u64>> = const { Cell::new(None) };
}

fn record_macs(n: u64) {
    MAC_COUNTER.with(|c| {
        if let Some(total) = c.get() {
            c.set(Some(total + n));
        }
    });
}

/// Runs `f` and returns the conv + linear multiply-adds performed in it on this thread, per
/// sample of the batch. Counting from executed layers rather than from per-model formulas
/// keeps the figure honest for any topology, shortcuts included.
pub(crate) fn count_macs(batch: i64, f: impl FnOnce()) -> u64 {
    MAC_COUNTER.with(|c| c.set(Some(0)));
    f();
    let total = MAC_COUNTER.with(|c| c.replace(None)).unwrap_or(0);
    total / batch.max(1) as u64
}

/// PyTorch's `kaiming_uniform_(a=√5)` and its bias rule both reduce to U(±1/√fan_in).
fn fan_in_uniform(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// A 2-D convolution that reports its multiply-adds to the counter.
#[derive(Debug)]
pub struct Conv2d {
    inner: nn::Conv2D,
    /// (C_in/groups)·kh·kw: multiply-adds per output element.
    macs_per_output: u64,
}

/// Square-kernel convolution with PyTorch default init; `groups == c_in` gives a depthwise conv.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    vs: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    padding: i64,
    groups: i64,
    bias: bool,
) -> Conv2d {
    let fan_in = (c_in / groups) * k * k;
    let cfg = nn::ConvConfig {
        stride,
        padding,
        groups,
        bias,
        ws_init: fan_in_uniform(fan_in),
        bs_init: fan_in_uniform(fan_in),
        ..Default::default()
    };
    Conv2d { inner: nn::conv2d(vs, c_in, c_out, k, cfg), macs_per_output: fan_in as u64 }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let ys = self.inner.forward(xs);
        record_macs(ys.numel() as u64 * self.macs_per_output);
        ys
    }
}

/// A fully connected layer that reports its multiply-adds to the counter.
#[derive(Debug)]
pub struct Linear {
    inner: nn::Linear,
    in_dim: i64,
    out_dim: i64,
}

pub fn linear(vs: nn::Path, in_dim: i64, out_dim: i64) -> Linear {
    let cfg = nn::LinearConfig { ws_init: fan_in_uniform(in_dim), bs_init: Some(fan_in_uniform(in_dim)), bias: true };
    Linear { inner: nn::linear(vs, in_dim, out_dim, cfg), in_dim, out_dim }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let ys = self.inner.forward(xs);
        let rows = if xs.dim() > 1 { xs.size()[0] } else { 1 };
        record_macs((rows * self.in_dim * self.out_dim) as u64);
        ys
    }
}

pub use super::batch_norm::batch_norm2d;
