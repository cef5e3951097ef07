//! VGG for CIFAR-10 (Simonyan & Zisserman configurations A/B/D/E) in the kuangliu layout:
//! every 3×3 conv keeps its bias and is followed by BatchNorm; a single Linear(512, classes)
//! replaces the ImageNet 4096-wide head since the feature map is 1×1 after five pools.

use super::batch_norm::BatchNorm2d;
use super::init::{batch_norm2d, conv2d, linear, Conv2d, Linear};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// A number is a conv width, `None` is a 2×2/2 max-pool.
#[rustfmt::skip]
const C11: &[Option<i64>] = &[
    Some(64), None, Some(128), None, Some(256), Some(256), None,
    Some(512), Some(512), None, Some(512), Some(512), None,
];
#[rustfmt::skip]
const C13: &[Option<i64>] = &[
    Some(64), Some(64), None, Some(128), Some(128), None, Some(256), Some(256), None,
    Some(512), Some(512), None, Some(512), Some(512), None,
];
#[rustfmt::skip]
const C16: &[Option<i64>] = &[
    Some(64), Some(64), None, Some(128), Some(128), None, Some(256), Some(256), Some(256), None,
    Some(512), Some(512), Some(512), None, Some(512), Some(512), Some(512), None,
];
#[rustfmt::skip]
const C19: &[Option<i64>] = &[
    Some(64), Some(64), None, Some(128), Some(128), None,
    Some(256), Some(256), Some(256), Some(256), None,
    Some(512), Some(512), Some(512), Some(512), None,
    Some(512), Some(512), Some(512), Some(512), None,
];

/// Configuration for a VGG depth (11, 13, 16 or 19).
pub(crate) fn config(depth: u32) -> Option<&'static [Option<i64>]> {
    match depth {
        11 => Some(C11),
        13 => Some(C13),
        16 => Some(C16),
        19 => Some(C19),
        _ => None,
    }
}

#[derive(Debug)]
enum Stage {
    // Boxed so the pool variant does not carry a conv-sized hole.
    ConvBnRelu(Box<(Conv2d, BatchNorm2d)>),
    MaxPool,
}

#[derive(Debug)]
pub struct Vgg {
    features: Vec<Stage>,
    classifier: Linear,
}

impl Vgg {
    pub fn new(vs: &nn::Path, cfg: &[Option<i64>], num_classes: i64) -> Self {
        let f = vs / "features";
        let mut features = Vec::with_capacity(cfg.len());
        // The sequential index counts conv, bn, relu and pool modules, as in the PyTorch
        // nn.Sequential, so that state_dict keys (features.<i>.*) line up.
        let mut idx = 0usize;
        let mut c_in = 3;
        for item in cfg {
            match *item {
                Some(c) => {
                    let conv = conv2d(&f / idx, c_in, c, 3, 1, 1, 1, true);
                    let bn = batch_norm2d(&f / (idx + 1), c);
                    features.push(Stage::ConvBnRelu(Box::new((conv, bn))));
                    idx += 3;
                    c_in = c;
                }
                None => {
                    features.push(Stage::MaxPool);
                    idx += 1;
                }
            }
        }
        let classifier = linear(vs / "classifier", c_in, num_classes);
        Vgg { features, classifier }
    }
}

impl ModuleT for Vgg {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.shallow_clone();
        for stage in &self.features {
            x = match stage {
                Stage::ConvBnRelu(cb) => cb.0.forward(&x).apply_t(&cb.1, train).relu_(),
                Stage::MaxPool => x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
            };
        }
        // The reference's trailing AvgPool2d(1, 1) is the identity and is omitted.
        self.classifier.forward(&x.flatten(1, -1))
    }
}
