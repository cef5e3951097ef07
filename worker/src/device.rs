//! Which device a worker process trains on.
//!
//! `--device` accepts `auto`, `cpu`, `cuda` and `cuda:K`. Without an index, CUDA means
//! "this process's local rank's GPU", the way torchrun and Slurm lay ranks out: a node runs
//! one process per GPU, and the launcher tells each its position on the node. The local
//! rank comes from `LOCAL_RANK` (torchrun, `cvdist local`, `cvdist worker --gpus`) or
//! `SLURM_LOCALID` (srun), and the process takes `cuda:(local_rank mod device_count)`.
//! The modulo makes both common Slurm layouts right: with `--gpus-per-task=1` each task
//! sees only its own GPU (count 1, so `cuda:0`); with all GPUs visible, task k takes GPU k.
//!
//! The logic is pure (the CUDA device count and the environment are inputs) so it can be
//! tested on a machine without a GPU.

use tch::Device;

/// What the user asked for with `--device` (parsed in `cvdist_common::choices`, so the
/// libtorch-free `cvdist` front end reads the flag the same way).
pub use cvdist_common::choices::DeviceRequest;

/// Environment variables that carry the process's rank on its node, in priority order.
pub const LOCAL_RANK_VARS: [&str; 2] = ["LOCAL_RANK", "SLURM_LOCALID"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} must be auto, cpu, cuda or cuda:K")]
    Syntax(String),
    /// Kept word for word from earlier releases: scripts may match it.
    #[error("device cuda:{index} requested but {count} CUDA device(s) are visible")]
    NoSuchGpu { index: usize, count: usize },
    #[error("device cuda requested but no CUDA device is visible")]
    NoCuda,
    #[error("{var}={value:?} is not a local rank (a non-negative integer)")]
    BadLocalRank { var: &'static str, value: String },
}

/// Parses a `--device` value.
pub fn parse(text: &str) -> Result<DeviceRequest, DeviceError> {
    text.parse().map_err(|e: cvdist_common::choices::DeviceSyntaxError| DeviceError::Syntax(e.0))
}

/// The local rank from the first of [`LOCAL_RANK_VARS`] that `lookup` finds set and
/// non-empty; None when neither is.
pub fn local_rank(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<usize>, DeviceError> {
    for var in LOCAL_RANK_VARS {
        if let Some(value) = lookup(var).filter(|v| !v.trim().is_empty()) {
            return value.trim().parse::<usize>().map(Some).map_err(|_| DeviceError::BadLocalRank { var, value });
        }
    }
    Ok(None)
}

/// The device for `request`, given how many CUDA devices this process sees and its local
/// rank (None: not launched as one of several processes on the node, i.e. rank 0).
///
/// Errors: `cuda:K` with K ≥ `cuda_count` ([`DeviceError::NoSuchGpu`], which also covers
/// no CUDA at all), and `cuda` with no CUDA device ([`DeviceError::NoCuda`]).
pub fn resolve(request: DeviceRequest, cuda_count: usize, local_rank: Option<usize>) -> Result<Device, DeviceError> {
    let local = local_rank.unwrap_or(0);
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto if cuda_count == 0 => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(Device::Cuda(local % cuda_count)),
        DeviceRequest::Cuda(None) if cuda_count == 0 => Err(DeviceError::NoCuda),
        DeviceRequest::Cuda(None) => Ok(Device::Cuda(local % cuda_count)),
        DeviceRequest::Cuda(Some(index)) if index >= cuda_count => {
            Err(DeviceError::NoSuchGpu { index, count: cuda_count })
        }
        DeviceRequest::Cuda(Some(index)) => Ok(Device::Cuda(index)),
    }
}

/// `--device TEXT` for this process: parses it, then as [`for_request`].
pub fn from_cli(text: &str) -> Result<Device, DeviceError> {
    for_request(parse(text)?)
}

/// The device for `request` in this process: reads the local rank from the environment
/// only when the choice depends on it, and checks the index against the visible devices.
pub fn for_request(request: DeviceRequest) -> Result<Device, DeviceError> {
    let count = match request {
        DeviceRequest::Cpu => 0,
        _ => visible_cuda_devices(),
    };
    let rank = match request {
        DeviceRequest::Auto | DeviceRequest::Cuda(None) if count > 0 => local_rank(|v| std::env::var(v).ok())?,
        _ => None,
    };
    resolve(request, count, rank)
}

/// Process-wide libtorch settings for training on `device`; called whenever an engine is
/// built for it. On CUDA: cuDNN benchmark mode, as `torch.backends.cudnn.benchmark = True`
/// — cuDNN times its convolution algorithms for each new input shape once and keeps the
/// fastest (a training run sees only two or three shapes: the batch, the last partial
/// batch, the evaluation batch). It makes the chosen algorithm, and so the last bits of a
/// GPU run's results, depend on those timings; GPU runs are not bit-reproducible anyway
/// (cuDNN's backward kernels accumulate with atomics). CPU runs are untouched.
pub fn configure(device: Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
}

/// CUDA devices libtorch can use in this process (0 without CUDA).
pub fn visible_cuda_devices() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(parse("auto"), Ok(DeviceRequest::Auto));
        assert_eq!(parse("cpu"), Ok(DeviceRequest::Cpu));
        assert_eq!(parse("cuda"), Ok(DeviceRequest::Cuda(None)));
        assert_eq!(parse("cuda:3"), Ok(DeviceRequest::Cuda(Some(3))));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA:0", "cuda0", ""] {
            assert_eq!(parse(bad), Err(DeviceError::Syntax(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn cuda_without_index_is_the_local_ranks_gpu_modulo_the_count() {
        // `cvdist local --workers 4` on a 2-GPU machine: workers 0..3 get 0, 1, 0, 1.
        let got: Vec<Device> = (0..4).map(|k| resolve(DeviceRequest::Cuda(None), 2, Some(k)).unwrap()).collect();
        assert_eq!(got, vec![Device::Cuda(0), Device::Cuda(1), Device::Cuda(0), Device::Cuda(1)]);
        // 8 GPUs, 8 ranks: one each.
        for k in 0..8 {
            assert_eq!(resolve(DeviceRequest::Cuda(None), 8, Some(k)), Ok(Device::Cuda(k)));
        }
        // Slurm --gpus-per-task=1: each task sees one GPU, whatever its local id.
        assert_eq!(resolve(DeviceRequest::Cuda(None), 1, Some(5)), Ok(Device::Cuda(0)));
        // No launcher: rank 0.
        assert_eq!(resolve(DeviceRequest::Cuda(None), 4, None), Ok(Device::Cuda(0)));
        // auto follows the same rule, and falls back to the CPU only without CUDA.
        assert_eq!(resolve(DeviceRequest::Auto, 4, Some(3)), Ok(Device::Cuda(3)));
        assert_eq!(resolve(DeviceRequest::Auto, 0, Some(3)), Ok(Device::Cpu));
        assert_eq!(resolve(DeviceRequest::Cpu, 8, Some(3)), Ok(Device::Cpu));
    }

    #[test]
    fn an_index_past_the_count_or_cuda_without_a_gpu_is_refused() {
        assert_eq!(resolve(DeviceRequest::Cuda(Some(2)), 2, None), Err(DeviceError::NoSuchGpu { index: 2, count: 2 }));
        assert_eq!(resolve(DeviceRequest::Cuda(Some(0)), 0, None), Err(DeviceError::NoSuchGpu { index: 0, count: 0 }));
        assert_eq!(resolve(DeviceRequest::Cuda(Some(1)), 2, Some(0)), Ok(Device::Cuda(1)), "an explicit index wins");
        assert_eq!(resolve(DeviceRequest::Cuda(None), 0, Some(1)), Err(DeviceError::NoCuda));
        let line = DeviceError::NoSuchGpu { index: 7, count: 2 }.to_string();
        assert_eq!(line, "device cuda:7 requested but 2 CUDA device(s) are visible");
    }

    #[test]
    fn local_rank_prefers_local_rank_then_slurm_localid() {
        assert_eq!(local_rank(env(&[])), Ok(None));
        assert_eq!(local_rank(env(&[("SLURM_LOCALID", "3")])), Ok(Some(3)));
        assert_eq!(local_rank(env(&[("LOCAL_RANK", "1"), ("SLURM_LOCALID", "3")])), Ok(Some(1)));
        assert_eq!(
            local_rank(env(&[("LOCAL_RANK", ""), ("SLURM_LOCALID", "2")])),
            Ok(Some(2)),
            "empty counts as unset"
        );
        assert_eq!(
            local_rank(env(&[("LOCAL_RANK", "one")])),
            Err(DeviceError::BadLocalRank { var: "LOCAL_RANK", value: "one".into() })
        );
        assert_eq!(
            local_rank(env(&[("SLURM_LOCALID", "-1")])).unwrap_err().to_string(),
            "SLURM_LOCALID=\"-1\" is not a local rank (a non-negative integer)"
        );
    }
}
