//! The model zoo: CIFAR-10 architectures built with tch so that variable names are exactly the
//! reference PyTorch state_dict keys (weights can move between the two unchanged) and initial
//! values follow PyTorch's default distributions.
//!
//! The valid names are the control plane's list, `cvdist_common::models::MODELS`; the zoo's
//! tests check that every one of them builds with the parameter count recorded there.

pub mod batch_norm;
mod cifar_resnet;
mod init;
mod mobilenetv2;
mod resnet;
mod vgg;

use thiserror::Error;

pub use cifar_resnet::CifarResNet;
pub use mobilenetv2::MobileNetV2;
pub use resnet::{BlockKind, ResNet};
pub use vgg::Vgg;

/// A built model; `ModuleT` already requires `Send`, so a training thread can own it.
pub type Model = Box<dyn tch::nn::ModuleT + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: &'static str,
    /// Trainable parameters with 10 classes (BN running statistics excluded).
    pub params: u64,
    /// Conv + linear multiply-adds for one 3×32×32 image, measured by a forward pass.
    pub macs: u64,
}

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("unknown model {0:?}; valid models: {valid}", valid = valid_names())]
    UnknownModel(String),
    #[error("num_classes must be positive, got {0}")]
    InvalidNumClasses(i64),
}

fn valid_names() -> String {
    cvdist_common::models::names().collect::<Vec<_>>().join(", ")
}

enum Arch {
    Vgg(&'static [Option<i64>]),
    ResNet(BlockKind, [usize; 4]),
    MobileNetV2,
    Cifar { n: usize, residual: bool },
}

fn arch(name: &str) -> Option<Arch> {
    // Only names the control plane knows are accepted, so the two lists cannot drift apart
    // silently (e.g. a "resnet26" that the parsers below would happily build).
    if !cvdist_common::models::is_known(name) {
        return None;
    }
    let depth = |prefix: &str| name.strip_prefix(prefix).and_then(|d| d.parse::<u32>().ok());
    if name == "mobilenetv2" {
        return Some(Arch::MobileNetV2);
    }
    if let Some(cfg) = depth("vgg").and_then(vgg::config) {
        return Some(Arch::Vgg(cfg));
    }
    if let Some(n) = depth("plain").and_then(cifar_resnet::blocks_per_stage) {
        return Some(Arch::Cifar { n, residual: false });
    }
    let d = depth("resnet")?;
    if let Some(n) = cifar_resnet::blocks_per_stage(d) {
        return Some(Arch::Cifar { n, residual: true });
    }
    resnet::config(d).map(|(kind, blocks)| Arch::ResNet(kind, blocks))
}

/// Builds `name` under `vs` (pass the VarStore root to get bare state_dict keys).
pub fn build(name: &str, vs: &tch::nn::Path, num_classes: i64) -> Result<Box<dyn tch::nn::ModuleT + Send>, ModelError> {
    if num_classes <= 0 {
        return Err(ModelError::InvalidNumClasses(num_classes));
    }
    let arch = arch(name).ok_or_else(|| ModelError::UnknownModel(name.to_string()))?;
    Ok(match arch {
        Arch::Vgg(cfg) => Box::new(Vgg::new(vs, cfg, num_classes)),
        Arch::ResNet(kind, blocks) => Box::new(ResNet::new(vs, kind, blocks, num_classes)),
        Arch::MobileNetV2 => Box::new(MobileNetV2::new(vs, num_classes)),
        Arch::Cifar { n, residual } => Box::new(CifarResNet::new(vs, n, residual, num_classes)),
    })
}

/// Parameter and MAC counts for `name` with 10 classes. Builds the model on the CPU and runs
/// one image through it, so it costs up to a few hundred milliseconds and ~250 MB for the
/// largest models; call it once, not per step.
pub fn info(name: &str) -> Result<ModelInfo, ModelError> {
    let static_name = cvdist_common::models::names()
        .find(|n| *n == name)
        .ok_or_else(|| ModelError::UnknownModel(name.to_string()))?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = build(name, &vs.root(), 10)?;
    let params = vs.trainable_variables().iter().map(|t| t.numel() as u64).sum();
    let macs = tch::no_grad(|| {
        let x = tch::Tensor::zeros([1, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
        init::count_macs(1, || {
            let _ = model.forward_t(&x, false);
        })
    });
    Ok(ModelInfo { name: static_name, params, macs })
}

/// `info` for every model, in the control plane's order.
pub fn all() -> Vec<ModelInfo> {
    cvdist_common::models::names()
        // Cannot fail: the zoo builds every control-plane name (checked by tests/model_zoo.rs).
        .map(|name| info(name).expect("control-plane model missing from the zoo"))
        .collect()
}
