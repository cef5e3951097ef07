//! The trainer configuration the in-process tests start from; a test changes the fields
//! its case is about.

use cvdist_common::proto::JobSpec;
use cvdist_worker::train::TrainerConfig;
use std::time::Duration;

/// Rank `rank` of `world_size` training `spec` on the CPU: no checkpoints, no resume,
/// BatchNorm training as usual, and progress reports too rare to fall inside a test.
pub fn cpu(spec: JobSpec, rank: usize, world_size: usize) -> TrainerConfig {
    TrainerConfig {
        spec,
        device: tch::Device::Cpu,
        rank,
        world_size,
        checkpoint_dir: None,
        resume: None,
        progress_interval: Duration::from_secs(3600),
        freeze_bn: false,
    }
}
