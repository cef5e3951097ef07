//! He et al. (2015, §4.2) CIFAR ResNets of depth 6n+2 with option-A (parameter-free)
//! shortcuts, and their "plain" twins without shortcuts, which the paper uses to show the
//! degradation problem.

use super::batch_norm::BatchNorm2d;
use super::init::{batch_norm2d, conv2d, linear, Conv2d, Linear};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// Blocks per stage, n, for a depth in {20, 32, 44, 56, 110}.
pub(crate) fn blocks_per_stage(depth: u32) -> Option<usize> {
    match depth {
        20 | 32 | 44 | 56 | 110 => Some(((depth - 2) / 6) as usize),
        _ => None,
    }
}

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    residual: bool,
    /// Zero channels added on each side by the option-A shortcut; `None` is the identity.
    pad: Option<i64>,
}

impl Block {
    fn new(vs: &nn::Path, c_in: i64, planes: i64, stride: i64, residual: bool) -> Self {
        Block {
            conv1: conv2d(vs / "conv1", c_in, planes, 3, stride, 1, 1, false),
            bn1: batch_norm2d(vs / "bn1", planes),
            conv2: conv2d(vs / "conv2", planes, planes, 3, 1, 1, 1, false),
            bn2: batch_norm2d(vs / "bn2", planes),
            residual,
            // The common PyTorch layout pads planes/4 on each side, which doubles the
            // channels exactly when the stage doubles them.
            pad: (stride != 1 || c_in != planes).then_some(planes / 4),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let out = self.conv1.forward(xs).apply_t(&self.bn1, train).relu_();
        let mut out = self.conv2.forward(&out).apply_t(&self.bn2, train);
        if !self.residual {
            return out.relu_();
        }
        let shortcut = match self.pad {
            None => xs.shallow_clone(),
            Some(p) => xs.slice(2, 0, None, 2).slice(3, 0, None, 2).constant_pad_nd([0, 0, 0, 0, p, p]),
        };
        (out + shortcut).relu_()
    }
}

#[derive(Debug)]
pub struct CifarResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    blocks: Vec<Block>,
    linear: Linear,
}

impl CifarResNet {
    /// `residual = false` builds plainN: same layers and parameters, no shortcuts.
    pub fn new(vs: &nn::Path, n: usize, residual: bool, num_classes: i64) -> Self {
        let conv1 = conv2d(vs / "conv1", 3, 16, 3, 1, 1, 1, false);
        let bn1 = batch_norm2d(vs / "bn1", 16);
        let mut blocks = Vec::with_capacity(3 * n);
        let mut c_in = 16;
        for (stage, (planes, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
            let stage_vs = vs / format!("layer{}", stage + 1);
            for k in 0..n {
                let s = if k == 0 { stride } else { 1 };
                blocks.push(Block::new(&(&stage_vs / k), c_in, planes, s, residual));
                c_in = planes;
            }
        }
        let linear = linear(vs / "linear", c_in, num_classes);
        CifarResNet { conv1, bn1, blocks, linear }
    }
}

impl ModuleT for CifarResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = self.conv1.forward(xs).apply_t(&self.bn1, train).relu_();
        for block in &self.blocks {
            x = block.forward_t(&x, train);
        }
        // Global average pool: the map is 8×8 for 32×32 input, but no size is assumed.
        let x = x.mean_dim([2i64, 3].as_slice(), false, None);
        self.linear.forward(&x)
    }
}
