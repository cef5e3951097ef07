//! ResNet-18/34/50/101/152 adapted to 32×32 inputs (kuangliu layout): 3×3 stride-1 stem and
//! no max-pool, so the four stages see 32/16/8/4 pixels; projection shortcuts (1×1 conv + BN)
//! wherever the shape changes.

use super::batch_norm::BatchNorm2d;
use super::init::{batch_norm2d, conv2d, linear, Conv2d, Linear};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3×3 convs, expansion 1.
    Basic,
    /// 1×1 → 3×3 (strided) → 1×1, expansion 4.
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Block kind and blocks per stage for a depth in {18, 34, 50, 101, 152}.
pub(crate) fn config(depth: u32) -> Option<(BlockKind, [usize; 4])> {
    match depth {
        18 => Some((BlockKind::Basic, [2, 2, 2, 2])),
        34 => Some((BlockKind::Basic, [3, 4, 6, 3])),
        50 => Some((BlockKind::Bottleneck, [3, 4, 6, 3])),
        101 => Some((BlockKind::Bottleneck, [3, 4, 23, 3])),
        152 => Some((BlockKind::Bottleneck, [3, 8, 36, 3])),
        _ => None,
    }
}

#[derive(Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    fn new(vs: &nn::Path, conv: &str, bn: &str, c_in: i64, c_out: i64, k: i64, stride: i64) -> Self {
        ConvBn { conv: conv2d(vs / conv, c_in, c_out, k, stride, k / 2, 1, false), bn: batch_norm2d(vs / bn, c_out) }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.conv.forward(xs).apply_t(&self.bn, train)
    }
}

#[derive(Debug)]
struct Block {
    /// conv1/bn1, conv2/bn2 and, for bottlenecks, conv3/bn3; ReLU after all but the last.
    convs: Vec<ConvBn>,
    /// `shortcut.0` / `shortcut.1`; `None` is the identity.
    shortcut: Option<ConvBn>,
}

impl Block {
    fn new(vs: &nn::Path, kind: BlockKind, c_in: i64, planes: i64, stride: i64) -> Self {
        let c_out = planes * kind.expansion();
        let convs = match kind {
            BlockKind::Basic => vec![
                ConvBn::new(vs, "conv1", "bn1", c_in, planes, 3, stride),
                ConvBn::new(vs, "conv2", "bn2", planes, planes, 3, 1),
            ],
            BlockKind::Bottleneck => vec![
                ConvBn::new(vs, "conv1", "bn1", c_in, planes, 1, 1),
                ConvBn::new(vs, "conv2", "bn2", planes, planes, 3, stride),
                ConvBn::new(vs, "conv3", "bn3", planes, c_out, 1, 1),
            ],
        };
        let shortcut =
            (stride != 1 || c_in != c_out).then(|| ConvBn::new(&(vs / "shortcut"), "0", "1", c_in, c_out, 1, stride));
        Block { convs, shortcut }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut out = xs.shallow_clone();
        for (i, cb) in self.convs.iter().enumerate() {
            out = cb.forward_t(&out, train);
            if i != last {
                // In place: BatchNorm's backward needs its input, not its output, so the
                // activation can overwrite it and save a full pass over memory.
                let _ = out.relu_();
            }
        }
        let identity = match &self.shortcut {
            Some(sc) => sc.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        let _ = out.g_add_(&identity);
        let _ = out.relu_();
        out
    }
}

#[derive(Debug)]
pub struct ResNet {
    stem: ConvBn,
    layers: Vec<Block>,
    linear: Linear,
}

impl ResNet {
    pub fn new(vs: &nn::Path, kind: BlockKind, blocks: [usize; 4], num_classes: i64) -> Self {
        let stem = ConvBn::new(vs, "conv1", "bn1", 3, 64, 3, 1);
        let mut layers = Vec::new();
        let mut c_in = 64;
        for (stage, ((planes, n), stride)) in [64, 128, 256, 512].into_iter().zip(blocks).zip([1, 2, 2, 2]).enumerate()
        {
            let stage_vs = vs / format!("layer{}", stage + 1);
            for k in 0..n {
                let s = if k == 0 { stride } else { 1 };
                layers.push(Block::new(&(&stage_vs / k), kind, c_in, planes, s));
                c_in = planes * kind.expansion();
            }
        }
        let linear = linear(vs / "linear", c_in, num_classes);
        ResNet { stem, layers, linear }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = self.stem.forward_t(xs, train);
        let _ = x.relu_();
        for block in &self.layers {
            x = block.forward_t(&x, train);
        }
        // 4×4 average pool over the final 4×4 map, as the reference does.
        let x = x.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        self.linear.forward(&x.flatten(1, -1))
    }
}
