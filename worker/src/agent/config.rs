//! What `cvdist-worker worker` is configured with, and what it tells the coordinator it
//! can do.

use cvdist_common::proto::WorkerCapabilities;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;

/// The default of `--detached-timeout`: how long a job keeps training without a session
/// with the coordinator before the worker stops it. Long enough for a coordinator restart
/// by hand or by an orchestrator (a rescheduled pod, an image pull: a minute or two); short
/// enough that training unobserved — no checkpoint stored, no metrics recorded — is bounded,
/// and shorter than the default collective timeout (600 s).
pub const DEFAULT_DETACHED_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything `cvdist-worker worker` is configured with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub worker_id: String,
    pub device: Device,
    pub threads: usize,
    pub data: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub data_listen: SocketAddr,
    pub advertise_addr: Option<String>,
    /// How long a running job keeps training without a session with the coordinator.
    pub detached_timeout: Duration,
}

pub fn capabilities(cfg: &WorkerConfig) -> WorkerCapabilities {
    let (device, gpu_name) = match cfg.device {
        Device::Cuda(k) => (format!("cuda:{k}"), "CUDA device".to_string()),
        _ => ("cpu".to_string(), String::new()),
    };
    WorkerCapabilities {
        device,
        gpu_name,
        gpu_memory_bytes: 0,
        threads: cfg.threads as u32,
        nccl: cfg.device.is_cuda() && crate::collective::c10d::nccl_built(),
        has_local_data: cfg.data.is_some(),
    }
}
