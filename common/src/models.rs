//! The model zoo's names, known to the control plane without libtorch so the coordinator
//! can reject an unknown model at submission. The worker's zoo is tested to build exactly
//! these, with exactly these parameter counts.

/// Name and trainable parameter count (10 classes) of every model cvdist can train.
pub const MODELS: &[(&str, u64)] = &[
    ("vgg11", 9_231_114),
    ("vgg13", 9_416_010),
    ("vgg16", 14_728_266),
    ("vgg19", 20_040_522),
    ("resnet18", 11_173_962),
    ("resnet34", 21_282_122),
    ("resnet50", 23_520_842),
    ("resnet101", 42_512_970),
    ("resnet152", 58_156_618),
    ("mobilenetv2", 2_296_922),
    ("resnet20", 269_722),
    ("resnet32", 464_154),
    ("resnet44", 658_586),
    ("resnet56", 853_018),
    ("resnet110", 1_727_962),
    ("plain20", 269_722),
    ("plain32", 464_154),
    ("plain44", 658_586),
    ("plain56", 853_018),
    ("plain110", 1_727_962),
];

/// Most bytes a checkpoint of `model` can take: fp32 weights and fp32 momentum (4 bytes
/// each per parameter), half as much again for BatchNorm buffers and rounding, and 4 MiB for
/// the safetensors header (tensor names and shapes). `None` for an unknown model. The
/// coordinator refuses larger uploads, so a member cannot fill its disk.
pub fn max_checkpoint_bytes(name: &str) -> Option<u64> {
    let params = MODELS.iter().find(|(n, _)| *n == name)?.1;
    Some(params * 4 * 2 + params * 4 / 2 + (4 << 20))
}

pub fn is_known(name: &str) -> bool {
    MODELS.iter().any(|(n, _)| *n == name)
}

pub fn names() -> impl Iterator<Item = &'static str> {
    MODELS.iter().map(|(n, _)| *n)
}
