//! Moving weights between cvdist checkpoints and plain PyTorch `state_dict`s stored as
//! safetensors (see docs/interop.md).
//!
//! * **Export** writes the checkpoint's model tensors under their PyTorch names (the zoo's
//!   variable names already are the reference `state_dict` keys) and adds the one buffer tch
//!   does not have, `<bn>.num_batches_tracked` (int64 scalar), for every BatchNorm, so
//!   `model.load_state_dict(safetensors.torch.load_file(path), strict=True)` works for the
//!   reference architecture in `tests/python/reference_models.py`. The header carries
//!   `__metadata__` `{"format": "pt", "model": ..., ...}`.
//! * **Import** reads a `state_dict` saved with `safetensors.torch.save_file`, checks every
//!   name and shape against the zoo model (ignoring `num_batches_tracked`, accepting a
//!   `module.` prefix from `DataParallel`), and writes an epoch-0 cvdist checkpoint without
//!   momentum that `cvdist-worker train --resume` can warm-start from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::eval::checkpoint_json;
use crate::models;
use crate::train::checkpoint::{self, CheckpointState};

/// The BatchNorm counter PyTorch keeps and tch does not.
pub const BN_COUNTER: &str = "num_batches_tracked";

/// Every error is one self-contained line (no separate source chain to repeat it).
#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Model(String),
    /// Names or shapes of imported weights do not fit the model.
    #[error("{path} does not fit model {model}: {reason}", path = .path.display())]
    Mismatch { path: PathBuf, model: String, reason: String },
    #[error("{path}: {reason}", path = .path.display())]
    File { path: PathBuf, reason: String },
}

fn file_err(path: &Path, reason: impl ToString) -> InteropError {
    InteropError::File { path: path.to_path_buf(), reason: reason.to_string() }
}

// ---------------------------------------------------------------------------------------
// safetensors with metadata, through the `safetensors` crate (tch's writer cannot set
// `__metadata__`).

fn dtype_of(kind: Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype;
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// One tensor's bytes (copied out of libtorch) as the `safetensors` crate serialises them.
struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` with string `metadata` in the header (the crate orders them as
/// `safetensors.torch.save_file` does and pads the header to 8 bytes), atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), InteropError> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind())
            .ok_or_else(|| file_err(path, format!("tensor {name:?} has unsupported kind {:?}", t.kind())))?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel).map_err(|e| file_err(path, e))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        host.push((name.as_str(), HostTensor { dtype, shape, bytes }));
    }
    let meta: Option<std::collections::HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let bytes = safetensors::serialize(host.iter().map(|(n, t)| (*n, t)), &meta)
        .map_err(|e| file_err(path, format!("cannot serialise: {e:?}")))?;
    cvdist_common::atomic_file::write(path, &bytes).map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// The `__metadata__` of a safetensors file's header (empty if it has none). The whole file
/// is checked by the `safetensors` crate: a header that does not parse, or tensors that do
/// not cover the file exactly, make it "not a safetensors file".
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, InteropError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file ({e:?})")))?;
    Ok(meta.metadata().clone().unwrap_or_default().into_iter().collect())
}

// ---------------------------------------------------------------------------------------
// Export.

/// Model tensors under their PyTorch names plus a `num_batches_tracked` scalar (int64) for
/// every BatchNorm (recognised by its `running_mean`), sorted by name.
pub fn pytorch_state_dict(model: &[(String, Tensor)], num_batches_tracked: i64) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> =
        model.iter().map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous())).collect();
    for (name, _) in model {
        if let Some(prefix) = name.strip_suffix(".running_mean") {
            out.push((format!("{prefix}.{BN_COUNTER}"), Tensor::from(num_batches_tracked)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Optimizer steps taken up to a checkpoint, when its run directory's `job.json` is next to
/// the `checkpoints/` folder (a `cvdist train` run or a coordinator job directory):
/// `epoch × steps_per_epoch + step`, with steps_per_epoch at the checkpoint's world size.
pub fn steps_taken(json_path: &Path, state: &CheckpointState) -> Option<u64> {
    let run = json_path.parent()?.parent()?;
    let text = std::fs::read(run.join(cvdist_common::run_dir::JOB_FILE)).ok()?;
    let spec: cvdist_common::proto::JobSpec = serde_json::from_slice(&text).ok()?;
    if spec.model != state.model || spec.batch_size == 0 {
        return None;
    }
    let dataset: cvdist_common::choices::Dataset = spec.dataset.parse().ok()?;
    let (full, _) = dataset.sizes();
    let len = cvdist_common::spec::train_len(&spec).min(full) as usize;
    let per_rank = cvdist_common::sampler::samples_per_rank(len, state.world_size.max(1) as usize);
    let steps_per_epoch = per_rank.div_ceil(spec.batch_size as usize) as u64;
    Some(state.epoch as u64 * steps_per_epoch + state.step)
}

/// What [`export_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub model: String,
    pub out: PathBuf,
    pub tensors: usize,
    pub parameters: u64,
    pub num_batches_tracked: i64,
}

/// Exports the checkpoint `checkpoint` (its JSON record or .safetensors file) to `out`.
/// `num_batches_tracked` defaults to [`steps_taken`], else 0.
pub fn export_checkpoint(
    checkpoint: &Path,
    out: &Path,
    num_batches_tracked: Option<i64>,
) -> Result<ExportSummary, InteropError> {
    let json = checkpoint_json(checkpoint);
    let ckpt = checkpoint::load(&json).map_err(|e| InteropError::Checkpoint(e.to_string()))?;
    // Check the tensors against the zoo so a stale or foreign checkpoint is not exported
    // under a model name it does not fit.
    let vs = VarStore::new(Device::Cpu);
    models::build(&ckpt.state.model, &vs.root(), 10).map_err(|e| InteropError::Model(e.to_string()))?;
    let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    checkpoint::restore_into(&json, &ckpt.model, &vars).map_err(|e| InteropError::Checkpoint(e.to_string()))?;
    let counter = num_batches_tracked.unwrap_or_else(|| steps_taken(&json, &ckpt.state).unwrap_or(0) as i64);
    let tensors = pytorch_state_dict(&ckpt.model, counter);
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("model".to_string(), ckpt.state.model.clone());
    meta.insert("num_classes".to_string(), "10".to_string());
    meta.insert("source".to_string(), "cvdist".to_string());
    meta.insert("checkpoint".to_string(), ckpt.state.name());
    meta.insert("epoch".to_string(), ckpt.state.epoch.to_string());
    meta.insert("step".to_string(), ckpt.state.step.to_string());
    meta.insert("checkpoint_sha256".to_string(), ckpt.state.sha256.clone());
    write_safetensors(out, &tensors, &meta)?;
    let parameters = vs.trainable_variables().iter().map(|t| t.numel() as u64).sum();
    Ok(ExportSummary {
        model: ckpt.state.model,
        out: out.to_path_buf(),
        tensors: tensors.len(),
        parameters,
        num_batches_tracked: counter,
    })
}

// ---------------------------------------------------------------------------------------
// Import.

/// Matches a PyTorch `state_dict` against the variables of `model` (a zoo name): returns
/// the model's variables, sorted by name, holding the imported values in the model's dtype.
/// `num_batches_tracked` entries are ignored; a `module.` prefix on every key is stripped.
pub fn match_state_dict(
    path: &Path,
    model: &str,
    state_dict: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>, InteropError> {
    let vs = VarStore::new(Device::Cpu);
    models::build(model, &vs.root(), 10).map_err(|e| InteropError::Model(e.to_string()))?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mismatch =
        |reason: String| InteropError::Mismatch { path: path.to_path_buf(), model: model.to_string(), reason };

    let strip_module = !state_dict.is_empty() && state_dict.iter().all(|(n, _)| n.starts_with("module."));
    let mut given: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in state_dict {
        let name = if strip_module { name["module.".len()..].to_string() } else { name };
        if name == BN_COUNTER || name.ends_with(&format!(".{BN_COUNTER}")) {
            continue;
        }
        given.insert(name, t);
    }
    let expected: BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = given.keys().find(|k| !expected.contains(k.as_str())) {
        return Err(mismatch(format!("unexpected tensor {extra:?} (the model has no such parameter or buffer)")));
    }
    let mut out = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let t = given.remove(name).ok_or_else(|| mismatch(format!("missing tensor {name:?}")))?;
        if t.size() != var.size() {
            return Err(mismatch(format!("{name:?} has shape {:?}, the model expects {:?}", t.size(), var.size())));
        }
        if !t.is_floating_point() {
            return Err(mismatch(format!("{name:?} has kind {:?}, expected a floating-point tensor", t.kind())));
        }
        out.push((name.clone(), t.to_kind(var.kind()).contiguous()));
    }
    Ok(out)
}

/// What [`import_weights`] wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub model: String,
    /// The checkpoint's JSON record.
    pub checkpoint: PathBuf,
    pub tensors: usize,
    pub ignored_counters: usize,
}

/// Imports `weights` (a PyTorch state_dict in safetensors) for zoo model `model` and writes
/// `ckpt-e0000-s000000.{safetensors,json}` into `out_dir`: epoch 0, step 0, no momentum,
/// world size 1, so `train --resume` starts a full schedule from these weights.
pub fn import_weights(model: &str, weights: &Path, out_dir: &Path) -> Result<ImportSummary, InteropError> {
    if !weights.is_file() {
        return Err(file_err(weights, "no such file"));
    }
    read_metadata(weights)?; // a clear "not a safetensors file" before libtorch's message
    let state_dict = Tensor::read_safetensors(weights).map_err(|e| file_err(weights, e))?;
    let ignored_counters = state_dict.iter().filter(|(n, _)| n.ends_with(BN_COUNTER)).count();
    let tensors = match_state_dict(weights, model, state_dict)?;
    let state = CheckpointState::new(model, 0, 0, 0, 1);
    let (json, _) =
        checkpoint::save(out_dir, state, &tensors, &[]).map_err(|e| InteropError::Checkpoint(e.to_string()))?;
    Ok(ImportSummary { model: model.to_string(), checkpoint: json, tensors: tensors.len(), ignored_counters })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dict_adds_counters_and_round_trips() {
        let vs = VarStore::new(Device::Cpu);
        models::build("resnet20", &vs.root(), 10).unwrap();
        let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let sd = pytorch_state_dict(&vars, 7);
        let bns = vars.iter().filter(|(n, _)| n.ends_with(".running_mean")).count();
        assert_eq!(sd.len(), vars.len() + bns);
        let (_, c) = sd.iter().find(|(n, _)| n == "bn1.num_batches_tracked").unwrap();
        assert_eq!(c.kind(), Kind::Int64);
        assert_eq!(c.size(), Vec::<i64>::new());
        assert_eq!(c.int64_value(&[]), 7);

        let dir = std::env::temp_dir().join(format!("cvdist-interop-unit-{}", std::process::id()));
        let path = dir.join("m.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(&path, &sd, &meta).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        // A truncated file or one that is no safetensors at all is named as such.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
        let e = read_metadata(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.safetensors: not a safetensors file"), "{e}");
        std::fs::write(&cut, b"{}").unwrap();
        assert!(read_metadata(&cut).unwrap_err().to_string().contains("not a safetensors file"));
        let back = Tensor::read_safetensors(&path).unwrap();
        assert_eq!(back.len(), sd.len());
        let matched = match_state_dict(&path, "resnet20", back).unwrap();
        assert_eq!(matched.len(), vars.len());
        for (name, t) in &matched {
            let (_, orig) = vars.iter().find(|(n, _)| n == name).unwrap();
            assert!(t.equal(orig), "{name} changed");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mismatches_name_the_tensor() {
        let vs = VarStore::new(Device::Cpu);
        models::build("resnet20", &vs.root(), 10).unwrap();
        let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let p = Path::new("w.safetensors");

        let mut missing = vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        missing.retain(|(n, _)| n != "linear.bias");
        let e = match_state_dict(p, "resnet20", missing).unwrap_err().to_string();
        assert!(e.contains("missing tensor \"linear.bias\""), "{e}");

        let mut extra = vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        extra.push(("fc.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        let e = match_state_dict(p, "resnet20", extra).unwrap_err().to_string();
        assert!(e.contains("unexpected tensor \"fc.weight\""), "{e}");

        let mut shape = vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        for (n, t) in shape.iter_mut() {
            if n == "linear.weight" {
                *t = Tensor::zeros([100, 64], (Kind::Float, Device::Cpu));
            }
        }
        let e = match_state_dict(p, "resnet20", shape).unwrap_err().to_string();
        assert!(e.contains("\"linear.weight\" has shape [100, 64], the model expects [10, 64]"), "{e}");

        let prefixed = vars.iter().map(|(n, t)| (format!("module.{n}"), t.shallow_clone())).collect::<Vec<_>>();
        assert!(match_state_dict(p, "resnet20", prefixed).is_ok());

        let e = match_state_dict(p, "resnet21", vec![]).unwrap_err().to_string();
        assert!(e.contains("unknown model"), "{e}");
    }
}
