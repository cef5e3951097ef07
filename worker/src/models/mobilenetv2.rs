//! MobileNetV2 (Sandler et al. 2018) adapted to CIFAR (kuangliu layout): stride-1 stem and
//! stride-1 second stage so the 32×32 input is downsampled only three times; ReLU instead of
//! ReLU6; residual on every stride-1 block, with a 1×1 projection when widths differ.

use super::batch_norm::BatchNorm2d;
use super::init::{batch_norm2d, conv2d, linear, Conv2d, Linear};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// (expansion t, output channels, repeats n, first stride), from the paper's Table 2 with
/// the CIFAR stride changes.
const CFG: [(i64, i64, usize, i64); 7] =
    [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    stride: i64,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    fn new(vs: &nn::Path, c_in: i64, c_out: i64, t: i64, stride: i64) -> Self {
        let planes = t * c_in;
        let shortcut = (stride == 1 && c_in != c_out).then(|| {
            let sc = vs / "shortcut";
            (conv2d(&sc / "0", c_in, c_out, 1, 1, 0, 1, false), batch_norm2d(&sc / "1", c_out))
        });
        Block {
            // Expand even when t = 1: the reference keeps the 1×1 conv there too.
            conv1: conv2d(vs / "conv1", c_in, planes, 1, 1, 0, 1, false),
            bn1: batch_norm2d(vs / "bn1", planes),
            conv2: conv2d(vs / "conv2", planes, planes, 3, stride, 1, planes, false),
            bn2: batch_norm2d(vs / "bn2", planes),
            conv3: conv2d(vs / "conv3", planes, c_out, 1, 1, 0, 1, false),
            bn3: batch_norm2d(vs / "bn3", c_out),
            stride,
            shortcut,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let out = self.conv1.forward(xs).apply_t(&self.bn1, train).relu_();
        let out = self.conv2.forward(&out).apply_t(&self.bn2, train).relu_();
        // Linear bottleneck: no activation after the projection.
        let out = self.conv3.forward(&out).apply_t(&self.bn3, train);
        if self.stride != 1 {
            return out;
        }
        match &self.shortcut {
            Some((conv, bn)) => out + conv.forward(xs).apply_t(bn, train),
            None => out + xs,
        }
    }
}

#[derive(Debug)]
pub struct MobileNetV2 {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Block>,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    linear: Linear,
}

impl MobileNetV2 {
    pub fn new(vs: &nn::Path, num_classes: i64) -> Self {
        let conv1 = conv2d(vs / "conv1", 3, 32, 3, 1, 1, 1, false);
        let bn1 = batch_norm2d(vs / "bn1", 32);
        let lvs = vs / "layers";
        let mut layers = Vec::new();
        let mut c_in = 32;
        for (t, c_out, n, stride) in CFG {
            for k in 0..n {
                let s = if k == 0 { stride } else { 1 };
                layers.push(Block::new(&(&lvs / layers.len()), c_in, c_out, t, s));
                c_in = c_out;
            }
        }
        let conv2 = conv2d(vs / "conv2", c_in, 1280, 1, 1, 0, 1, false);
        let bn2 = batch_norm2d(vs / "bn2", 1280);
        let linear = linear(vs / "linear", 1280, num_classes);
        MobileNetV2 { conv1, bn1, layers, conv2, bn2, linear }
    }
}

impl ModuleT for MobileNetV2 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = self.conv1.forward(xs).apply_t(&self.bn1, train).relu_();
        for block in &self.layers {
            x = block.forward_t(&x, train);
        }
        let x = self.conv2.forward(&x).apply_t(&self.bn2, train).relu_();
        let x = x.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        self.linear.forward(&x.flatten(1, -1))
    }
}
