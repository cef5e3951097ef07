//! A checkpoint's record: `NAME.json` next to `NAME.safetensors`, written by the worker's
//! rank 0 and by the coordinator when it stores an upload, read by both. It says where
//! training resumes, what the partial epoch had accumulated and the checksum of the tensor
//! file. On the wire it is the proto message `CheckpointState` (conversions in
//! `crate::convert`); the name is `crate::names::checkpoint_name(epoch, step)`.

use crate::epoch_sums::EpochSums;
use serde::{Deserialize, Serialize};

/// Version of the JSON record; a reader refuses any other.
pub const FORMAT_VERSION: u32 = 1;

/// Where training resumes and what it had accumulated: enough for a bit-identical resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub format_version: u32,
    pub model: String,
    /// Epoch to resume in (0-based) and the number of its steps already taken.
    pub epoch: u32,
    pub step: u64,
    pub seed: u64,
    pub world_size: u32,
    /// Running sums of the partially trained epoch over all ranks (`EpochSums::total`,
    /// rank 0's clock, no all-reduce seconds; JSON: four numbers). For readers; resuming
    /// uses `rank_partials`.
    /// (With mixed precision an overflowed step's loss can make the first one non-finite;
    /// such values are written as `crate::nonfinite` describes.)
    #[serde(with = "crate::epoch_sums::four")]
    pub partial: EpochSums,
    /// Each rank's own running sums of the partially trained epoch, by rank (JSON: a row
    /// of five numbers each, in `EpochSums::to_array` order). A resumed rank continues from its own
    /// entry, so the epoch's totals equal the uninterrupted run's bit for bit. Empty in
    /// checkpoints written before this field existed (and at epoch boundaries).
    #[serde(default, with = "crate::epoch_sums::rows_of_five")]
    pub rank_partials: Vec<EpochSums>,
    /// The fp16 loss scale (1.0 for fp32/bf16 runs); kept for readers, resuming uses
    /// `grad_scaler`.
    #[serde(with = "crate::nonfinite")]
    pub loss_scale: f64,
    /// The fp16 loss scaler's scale and growth tracker; absent for fp32/bf16 runs and in
    /// checkpoints written before the tracker was saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<ScalerState>,
    /// SHA-256 (hex) and size in bytes of the `.safetensors` file.
    pub sha256: String,
    pub bytes: u64,
    /// When the record was made, Unix seconds.
    pub created_unix: f64,
}

/// What a checkpoint keeps of the fp16 loss scaler: enough for a bit-identical resume.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    /// Consecutive clean steps since the last growth or overflow.
    pub growth_tracker: i64,
}

impl CheckpointState {
    /// A record for a checkpoint about to be written; the writer fills in the checksum.
    pub fn new(model: &str, epoch: u32, step: u64, seed: u64, world_size: u32) -> CheckpointState {
        CheckpointState {
            format_version: FORMAT_VERSION,
            model: model.to_string(),
            epoch,
            step,
            seed,
            world_size,
            partial: EpochSums::default(),
            rank_partials: Vec::new(),
            loss_scale: 1.0,
            grad_scaler: None,
            sha256: String::new(),
            bytes: 0,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }

    /// The checkpoint's name, from its position.
    pub fn name(&self) -> String {
        crate::names::checkpoint_name(self.epoch, self.step)
    }

    /// The JSON record as stored in `NAME.json`.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data (non-finite numbers are written as null): cannot fail.
        serde_json::to_vec_pretty(self).expect("a checkpoint state serialises")
    }

    /// Reads a `NAME.json` record.
    pub fn from_json(bytes: &[u8]) -> Result<CheckpointState, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
