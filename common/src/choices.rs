//! The closed sets of values a job or a command takes: dataset, collective, precision,
//! gradient compression and device. Each value has one spelling, used on the command line, in `--help`, in the job
//! spec on the wire (`proto/cvdist.proto` keeps these fields as strings so older clients
//! and the Python client stay valid) and in run directories: [`Display`](std::fmt::Display)
//! writes it and [`FromStr`] reads it back, here and nowhere else.
//!
//! Parse errors are the one-line messages users already know ([`ChoiceError`] for job
//! fields, [`DeviceSyntaxError`] for `--device`); `crate::args::parse` prints them as they
//! are instead of clap's multi-line usage error.

use std::fmt;
use std::str::FromStr;

/// A value outside one of the closed sets, as the one line users see.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChoiceError {
    #[error("unknown dataset {0:?}; expected \"cifar10\" or \"synthetic\"")]
    Dataset(String),
    #[error("unknown collective {0:?}; expected \"auto\", \"ring\", \"gloo\" or \"nccl\"")]
    Collective(String),
    #[error("precision must be \"fp32\", \"bf16\" or \"fp16\", got {0:?}")]
    Precision(String),
    #[error("unknown gradient compression {0:?}; expected \"none\", \"bf16\" or \"fp16\"")]
    GradCompression(String),
}

/// Training-set and test-set sizes of CIFAR-10 (the official binary version).
pub const CIFAR10_TRAIN: u64 = 50_000;
pub const CIFAR10_TEST: u64 = 10_000;
/// Sizes of the generated `synthetic` dataset (same shapes as CIFAR-10, fewer images).
pub const SYNTHETIC_TRAIN: u64 = 5_000;
pub const SYNTHETIC_TEST: u64 = 1_000;

/// Where a job's images come from (`--dataset`, `JobSpec.dataset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dataset {
    /// CIFAR-10, binary version: 50,000 training and 10,000 test images.
    #[default]
    Cifar10,
    /// Generated images of CIFAR-10's shape, the same on every machine (tests, smoke runs).
    Synthetic,
}

impl Dataset {
    pub const ALL: [Dataset; 2] = [Dataset::Cifar10, Dataset::Synthetic];

    /// The spelling on the command line and in `JobSpec.dataset`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar10",
            Dataset::Synthetic => "synthetic",
        }
    }

    /// Images in the whole training and test split (before `--train-samples` /
    /// `--test-samples` cut them).
    pub const fn sizes(self) -> (u64, u64) {
        match self {
            Dataset::Cifar10 => (CIFAR10_TRAIN, CIFAR10_TEST),
            Dataset::Synthetic => (SYNTHETIC_TRAIN, SYNTHETIC_TEST),
        }
    }
}

impl FromStr for Dataset {
    type Err = ChoiceError;
    fn from_str(s: &str) -> Result<Dataset, ChoiceError> {
        Dataset::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| ChoiceError::Dataset(s.to_string()))
    }
}

/// How gradients are averaged (`--collective`, `JobSpec.collective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Collective {
    /// NCCL when every rank trains on CUDA, else the TCP ring.
    #[default]
    Auto,
    /// cvdist's pipelined TCP ring (CPU tensors; CUDA ones are staged through the host).
    Ring,
    /// PyTorch's c10d `ProcessGroupGloo` (CPU tensors): the same code path as NCCL.
    Gloo,
    /// PyTorch's c10d `ProcessGroupNCCL` (CUDA tensors).
    Nccl,
}

impl Collective {
    pub const ALL: [Collective; 4] = [Collective::Auto, Collective::Ring, Collective::Gloo, Collective::Nccl];

    /// The spelling on the command line and in `JobSpec.collective`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Collective::Auto => "auto",
            Collective::Ring => "ring",
            Collective::Gloo => "gloo",
            Collective::Nccl => "nccl",
        }
    }
}

impl FromStr for Collective {
    type Err = ChoiceError;
    fn from_str(s: &str) -> Result<Collective, ChoiceError> {
        Collective::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| ChoiceError::Collective(s.to_string()))
    }
}

/// Arithmetic precision of training (`--precision`, `JobSpec.precision`). A clap
/// `ValueEnum`, so `--help` lists the values and a wrong one gets clap's "possible values"
/// message, as since the flag was added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Precision {
    // Plain comments, not doc comments: clap would list those in `--help` under each value.
    #[default]
    Fp32,
    // bfloat16 autocast (CPU and CUDA), no loss scaling.
    Bf16,
    // float16 autocast (CUDA) with dynamic loss scaling.
    Fp16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Bf16, Precision::Fp16];

    /// The spelling on the command line and in `JobSpec.precision`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

impl FromStr for Precision {
    type Err = ChoiceError;
    fn from_str(s: &str) -> Result<Precision, ChoiceError> {
        Precision::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| ChoiceError::Precision(s.to_string()))
    }
}

/// How gradient buckets travel between ranks (`--grad-compression`,
/// `JobSpec.grad_compression`). Only the per-step gradient all-reduce is affected; weight
/// broadcasts, BatchNorm statistics and metric sums stay exact f32. With a 16-bit format
/// every hop carries the partial sum rounded to 16 bits, the receiver adds it to its own
/// f32 values in f32, and every rank ends with the same rounded sum
/// (`worker/src/collective/compress.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GradCompression {
    /// f32 on the wire: bit-for-bit today's results.
    #[default]
    None,
    /// bfloat16: f32's range, 8 significant bits (relative rounding error <= 2^-8 per hop).
    Bf16,
    /// IEEE float16: 11 significant bits (<= 2^-11 per hop) but a range of only ±65504:
    /// a larger partial or final sum becomes ±inf on the wire, and magnitudes below
    /// 2^-24 (about 6e-8) round to 0.
    Fp16,
}

impl GradCompression {
    pub const ALL: [GradCompression; 3] = [GradCompression::None, GradCompression::Bf16, GradCompression::Fp16];

    /// The spelling on the command line and in `JobSpec.grad_compression`.
    pub const fn as_str(self) -> &'static str {
        match self {
            GradCompression::None => "none",
            GradCompression::Bf16 => "bf16",
            GradCompression::Fp16 => "fp16",
        }
    }
}

impl FromStr for GradCompression {
    type Err = ChoiceError;
    fn from_str(s: &str) -> Result<GradCompression, ChoiceError> {
        GradCompression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| ChoiceError::GradCompression(s.to_string()))
    }
}

/// What `--device` asks for. Resolving it to a real device (how many GPUs are visible,
/// the local rank) needs libtorch and happens in the worker (`worker/src/device.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceRequest {
    /// The local rank's GPU when CUDA is available, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// `cuda` (None: the local rank's GPU) or `cuda:K`.
    Cuda(Option<usize>),
}

/// A `--device` value that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {0:?} must be auto, cpu, cuda or cuda:K")]
pub struct DeviceSyntaxError(pub String);

impl FromStr for DeviceRequest {
    type Err = DeviceSyntaxError;
    fn from_str(text: &str) -> Result<DeviceRequest, DeviceSyntaxError> {
        match text {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|k| k.parse::<usize>().ok())
                .map(|k| DeviceRequest::Cuda(Some(k)))
                .ok_or_else(|| DeviceSyntaxError(other.to_string())),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(None) => f.write_str("cuda"),
            DeviceRequest::Cuda(Some(k)) => write!(f, "cuda:{k}"),
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Dataset, Collective, Precision, GradCompression);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value reads back from its own spelling, and the spellings are the ones the
    /// proto comments and older clients use.
    #[test]
    fn spellings_round_trip() {
        for d in Dataset::ALL {
            assert_eq!(d.to_string().parse::<Dataset>(), Ok(d));
        }
        for c in Collective::ALL {
            assert_eq!(c.to_string().parse::<Collective>(), Ok(c));
        }
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        let names: Vec<String> = Dataset::ALL.iter().map(|d| d.to_string()).collect();
        assert_eq!(names, ["cifar10", "synthetic"]);
        let names: Vec<String> = Collective::ALL.iter().map(|c| c.to_string()).collect();
        assert_eq!(names, ["auto", "ring", "gloo", "nccl"]);
        let names: Vec<String> = Precision::ALL.iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["fp32", "bf16", "fp16"]);
        for c in GradCompression::ALL {
            assert_eq!(c.to_string().parse::<GradCompression>(), Ok(c));
        }
        let names: Vec<String> = GradCompression::ALL.iter().map(|c| c.to_string()).collect();
        assert_eq!(names, ["none", "bf16", "fp16"]);
    }

    #[test]
    fn unknown_values_keep_their_messages() {
        assert_eq!(
            "imagenet".parse::<Dataset>().unwrap_err().to_string(),
            "unknown dataset \"imagenet\"; expected \"cifar10\" or \"synthetic\""
        );
        assert_eq!(
            "mpi".parse::<Collective>().unwrap_err().to_string(),
            "unknown collective \"mpi\"; expected \"auto\", \"ring\", \"gloo\" or \"nccl\""
        );
        assert_eq!(
            "half".parse::<Precision>().unwrap_err().to_string(),
            "precision must be \"fp32\", \"bf16\" or \"fp16\", got \"half\""
        );
        // The empty string is the wire's "unset" (see `GradCompression::from_spec`), not
        // a spelling the command line takes.
        for bad in ["fp8", "", "BF16", "int8"] {
            assert_eq!(bad.parse::<GradCompression>(), Err(ChoiceError::GradCompression(bad.into())));
        }
        assert_eq!(
            "fp8".parse::<GradCompression>().unwrap_err().to_string(),
            "unknown gradient compression \"fp8\"; expected \"none\", \"bf16\" or \"fp16\""
        );
    }

    #[test]
    fn device_forms() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(None)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(Some(3))));
        for text in ["auto", "cpu", "cuda", "cuda:0", "cuda:12"] {
            assert_eq!(text.parse::<DeviceRequest>().unwrap().to_string(), text);
        }
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA:0", "cuda0", ""] {
            assert_eq!(bad.parse::<DeviceRequest>(), Err(DeviceSyntaxError(bad.into())), "{bad:?}");
        }
        assert_eq!(DeviceSyntaxError("gpu".into()).to_string(), "device \"gpu\" must be auto, cpu, cuda or cuda:K");
    }
}
