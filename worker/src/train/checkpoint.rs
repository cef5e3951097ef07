//! Checkpoints: `NAME.safetensors` (weights, BatchNorm buffers, momentum buffers) and
//! `NAME.json` (position in training, accumulators, SHA-256 of the tensor file).
//!
//! The tensor file is written first (temp + fsync + rename), the JSON last: the JSON is the
//! commit record, so a crash mid-write leaves an incomplete checkpoint that [`latest`]
//! skips. A checkpoint whose tensor file does not match its recorded checksum is skipped
//! too, with a warning, and the previous one is used.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::Tensor;

// The JSON record is shared with the coordinator, which stores and serves it.
pub use cvdist_common::checkpoint::{CheckpointState, FORMAT_VERSION};

const MODEL_PREFIX: &str = "model.";
const MOMENTUM_PREFIX: &str = "momentum.";

pub fn name_for(epoch: u32, step: u64) -> String {
    cvdist_common::names::checkpoint_name(epoch, step)
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read checkpoint {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path} does not fit this model: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub model: Vec<(String, Tensor)>,
    pub momentum: Vec<(String, Tensor)>,
}

/// Writes a checkpoint into `dir`; returns its JSON path and the completed record.
/// The same as [`snapshot`] then [`write_snapshot`], on the calling thread.
pub fn save(
    dir: &Path,
    state: CheckpointState,
    model: &[(String, Tensor)],
    momentum: &[(String, Tensor)],
) -> Result<(PathBuf, CheckpointState), CheckpointError> {
    write_snapshot(dir, state, &snapshot(model, momentum))
}

/// Host copies of the tensors a checkpoint holds, under their stored names: what the
/// training thread hands to the background writer. Always a copy (on CPU too), so the
/// training thread may go on updating its tensors in place while the copy is written.
pub struct Snapshot {
    named: Vec<(String, Tensor)>,
}

/// Copies `model` and `momentum` into host memory, contiguous row-major (safetensors
/// stores row-major bytes, while conv weights and their momentum train in channels_last
/// strides).
pub fn snapshot(model: &[(String, Tensor)], momentum: &[(String, Tensor)]) -> Snapshot {
    let host = |t: &Tensor| {
        let mut copy = Tensor::empty(t.size(), (t.kind(), tch::Device::Cpu));
        tch::no_grad(|| copy.copy_(&t.detach()));
        copy
    };
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(model.len() + momentum.len());
    for (n, t) in model {
        named.push((format!("{MODEL_PREFIX}{n}"), host(t)));
    }
    for (n, t) in momentum {
        named.push((format!("{MOMENTUM_PREFIX}{n}"), host(t)));
    }
    // The header lists tensors by name; the data follows in the same order.
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Snapshot { named }
}

/// The safetensors dtype name of `kind` (the format's spelling).
fn dtype_name(kind: tch::Kind) -> Option<&'static str> {
    use tch::Kind::*;
    Some(match kind {
        Float => "F32",
        Double => "F64",
        Half => "F16",
        BFloat16 => "BF16",
        Int64 => "I64",
        Int => "I32",
        Int16 => "I16",
        Int8 => "I8",
        Uint8 => "U8",
        Bool => "BOOL",
        _ => return None,
    })
}

/// The bytes of a contiguous CPU tensor.
fn tensor_bytes(t: &Tensor) -> &[u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // FFI, not a byte cast: libtorch's storage behind a raw pointer, which `bytemuck` cannot
    // view (tch's own `copy_data_u8` would copy the whole model once more).
    // SAFETY: `snapshot` made `t` a contiguous CPU tensor this Snapshot owns alone; its
    // storage holds `numel × element size` bytes and lives as long as the borrow of `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// A writer that hashes and counts every byte on its way to the file, so the checksum is
/// known when the write ends, without reading the file back.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `snap` as checkpoint `state` into `dir` (safetensors to a temp file, hashed
/// while it is written, fsync, rename; then the JSON record, atomically); returns the
/// JSON path and the completed record. Runs on the checkpoint writer thread.
pub fn write_snapshot(
    dir: &Path,
    mut state: CheckpointState,
    snap: &Snapshot,
) -> Result<(PathBuf, CheckpointState), CheckpointError> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Write { path: dir.to_path_buf(), source })?;
    let name = state.name();
    let tensors_path = dir.join(format!("{name}.safetensors"));
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| CheckpointError::Write { path, source }
    };
    // Temp file next to the destination, removed if anything below fails (a partial file
    // would keep a full disk full for the next attempt).
    let file = cvdist_common::atomic_file::AtomicFile::create(&tensors_path).map_err(werr(&tensors_path))?;
    let tmp = file.temp_path().to_path_buf();
    // The safetensors layout: u64 little-endian header length, a JSON header naming each
    // tensor's dtype, shape and byte range, then the tensors' bytes back to back. Written
    // here rather than with the `safetensors` crate so the bytes stream from the snapshot
    // through the hash into the file without a second in-memory copy of the model.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (n, t) in &snap.named {
        let dtype = dtype_name(t.kind()).ok_or_else(|| CheckpointError::Write {
            path: tmp.clone(),
            source: std::io::Error::other(format!(
                "tensor {n:?} has kind {:?}, which safetensors cannot store",
                t.kind()
            )),
        })?;
        let len = tensor_bytes(t).len();
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("header serialises");
    // Padded with spaces to 8 bytes so the data is aligned, as the reference writer does.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut out =
        HashingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, file), hash: Sha256::new(), bytes: 0 };
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(werr(&tmp))?;
    out.write_all(&header).map_err(werr(&tmp))?;
    for (_, t) in &snap.named {
        out.write_all(tensor_bytes(t)).map_err(werr(&tmp))?;
    }
    let HashingWriter { inner, hash, bytes } = out;
    let file = inner.into_inner().map_err(|e| werr(&tmp)(e.into_error()))?;
    file.commit().map_err(werr(&tensors_path))?;
    let sha = hex::encode(hash.finalize());
    state.sha256 = sha;
    state.bytes = bytes;
    let json_path = dir.join(format!("{name}.json"));
    cvdist_common::atomic_file::write(&json_path, &state.to_json())
        .map_err(|source| CheckpointError::Write { path: json_path.clone(), source })?;
    Ok((json_path, state))
}

/// Reads and verifies the checkpoint whose JSON record is `json_path`.
pub fn load(json_path: &Path) -> Result<Checkpoint, CheckpointError> {
    let text =
        std::fs::read(json_path).map_err(|source| CheckpointError::Read { path: json_path.to_path_buf(), source })?;
    let state = CheckpointState::from_json(&text)
        .map_err(|e| CheckpointError::Corrupt { path: json_path.to_path_buf(), reason: e.to_string() })?;
    if state.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Corrupt {
            path: json_path.to_path_buf(),
            reason: format!("format version {} (expected {FORMAT_VERSION})", state.format_version),
        });
    }
    let tensors_path = json_path.with_extension("safetensors");
    let bytes =
        std::fs::read(&tensors_path).map_err(|source| CheckpointError::Read { path: tensors_path.clone(), source })?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != state.sha256 || bytes.len() as u64 != state.bytes {
        return Err(CheckpointError::Corrupt {
            path: tensors_path,
            reason: format!(
                "checksum {sha} ({} bytes) does not match recorded {} ({} bytes)",
                bytes.len(),
                state.sha256,
                state.bytes
            ),
        });
    }
    let tensors = Tensor::read_safetensors(&tensors_path)
        .map_err(|e| CheckpointError::Corrupt { path: tensors_path.clone(), reason: e.to_string() })?;
    let mut model = Vec::new();
    let mut momentum = Vec::new();
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix(MODEL_PREFIX) {
            model.push((n.to_string(), t));
        } else if let Some(n) = name.strip_prefix(MOMENTUM_PREFIX) {
            momentum.push((n.to_string(), t));
        } else {
            return Err(CheckpointError::Corrupt { path: tensors_path, reason: format!("unexpected tensor {name:?}") });
        }
    }
    Ok(Checkpoint { state, model, momentum })
}

/// JSON records in `dir`, newest position first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_stem()
                    .is_some_and(|n| n.to_str().is_some_and(|n| cvdist_common::names::parse_checkpoint_name(n).is_ok()))
        })
        .collect();
    // Names sort by (epoch, step) because both fields are zero-padded.
    found.sort();
    found.reverse();
    found
}

/// The newest checkpoint in `dir` that verifies; corrupt ones are skipped with a warning.
pub fn latest(dir: &Path) -> Option<Checkpoint> {
    for path in list(dir) {
        match load(&path) {
            Ok(c) => return Some(c),
            Err(e) => tracing::warn!(checkpoint = %path.display(), error = %e, "skipping unusable checkpoint"),
        }
    }
    None
}

/// Copies saved tensors into the model's variables, checking names and shapes.
pub fn restore_into(
    path: &Path,
    saved: &[(String, Tensor)],
    variables: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    let mismatch = |reason: String| CheckpointError::Mismatch { path: path.to_path_buf(), reason };
    if saved.len() != variables.len() {
        return Err(mismatch(format!("{} tensors saved, model has {}", saved.len(), variables.len())));
    }
    tch::no_grad(|| {
        for (name, var) in variables {
            let (_, src) =
                saved.iter().find(|(n, _)| n == name).ok_or_else(|| mismatch(format!("missing tensor {name:?}")))?;
            if src.size() != var.size() {
                return Err(mismatch(format!("{name:?} has shape {:?}, model expects {:?}", src.size(), var.size())));
            }
            let mut dst = var.shallow_clone();
            dst.copy_(&src.to_device(var.device()).to_kind(var.kind()));
        }
        Ok(())
    })
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::scaler::ScalerState;
    use tch::{Device, Kind};

    /// The background writer's file is a valid safetensors file (read back by libtorch's
    /// reader, every tensor and dtype equal, checksum verified by `load`), and the fp16
    /// scaler state survives the round trip; a record without it reads as None.
    #[test]
    fn written_snapshot_loads_back_with_scaler_state() {
        let dir = tempfile::tempdir().unwrap();
        // channels_last strides, an odd-sized tensor and an i64 buffer, as in the zoo.
        let conv = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu))
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2]);
        let model = vec![
            ("conv.weight".to_string(), conv),
            ("bn.num_batches_tracked".to_string(), Tensor::from_slice(&[7i64])),
            ("fc.bias".to_string(), Tensor::randn([5], (Kind::Float, Device::Cpu))),
        ];
        let momentum = vec![("conv.weight".to_string(), Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu)))];
        let mut state = CheckpointState::new("resnet20", 1, 3, 0, 1);
        state.grad_scaler = Some(ScalerState { scale: 4096.0, growth_tracker: 17 });
        let (json, written) = save(dir.path(), state, &model, &momentum).unwrap();
        let loaded = load(&json).unwrap();
        assert_eq!(loaded.state, written);
        assert_eq!(loaded.state.grad_scaler, Some(ScalerState { scale: 4096.0, growth_tracker: 17 }));
        let find = |set: &[(String, Tensor)], n: &str| {
            set.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone()).unwrap()
        };
        for (n, t) in &model {
            let got = find(&loaded.model, n);
            assert_eq!(got.kind(), t.kind(), "{n}");
            assert!(got.equal(t), "{n}");
        }
        assert!(find(&loaded.momentum, "conv.weight").equal(&momentum[0].1));
        // Records written before the field existed.
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        value.as_object_mut().unwrap().remove("grad_scaler");
        let old: CheckpointState = serde_json::from_value(value).unwrap();
        assert_eq!(old.grad_scaler, None);
    }
}
