//! Evaluation of a checkpoint on the test set: accuracy, per-class accuracy and the confusion
//! matrix, as `cvdist-worker eval` prints and writes (`--json-out`, read by `cvdist eval`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cvdist_common::choices::Dataset;
use cvdist_common::cifar::{CifarSplit, NUM_CLASSES};
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::data::datasets;
use crate::data::loader::Loader;
use crate::models::{self, Model};
use crate::train::checkpoint::{self, CheckpointState};

/// CIFAR-10 class names, in label order (as in the dataset's batches.meta.txt).
pub const CLASSES: [&str; NUM_CLASSES] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Images per evaluation batch (as the trainer's and the reference recipe's test loader).
pub const EVAL_BATCH: usize = 100;

/// Every error is one self-contained line.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Data(String),
}

/// The checkpoint's JSON record for either of its two files (`NAME.json` or
/// `NAME.safetensors`); other paths are returned unchanged.
pub fn checkpoint_json(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "safetensors") {
        path.with_extension("json")
    } else {
        path.to_path_buf()
    }
}

/// A zoo model with a checkpoint's weights and buffers.
pub struct LoadedModel {
    pub state: CheckpointState,
    /// The JSON record that was loaded.
    pub json: PathBuf,
    pub vs: VarStore,
    pub model: Model,
}

/// Verifies and loads a checkpoint (JSON or .safetensors path) into a freshly built model
/// on `device`.
pub fn load_model(checkpoint: &Path, device: Device) -> Result<LoadedModel, EvalError> {
    let json = checkpoint_json(checkpoint);
    let ckpt = checkpoint::load(&json).map_err(|e| EvalError::Checkpoint(e.to_string()))?;
    let vs = VarStore::new(device);
    let model = models::build(&ckpt.state.model, &vs.root(), 10)
        .map_err(|e| EvalError::Model(format!("checkpoint {}: {e}", json.display())))?;
    let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    checkpoint::restore_into(&json, &ckpt.model, &vars).map_err(|e| EvalError::Checkpoint(e.to_string()))?;
    Ok(LoadedModel { state: ckpt.state, json, vs, model })
}

/// The test split to evaluate on, cut to the first `test_samples` images (0 = all), the same
/// images training evaluates on for this dataset (`crate::data::datasets`).
pub fn test_split(dataset: Dataset, data: Option<&Path>, test_samples: u64) -> Result<Arc<CifarSplit>, EvalError> {
    if dataset == Dataset::Cifar10 && data.is_none() {
        return Err(EvalError::Data(
            "evaluating on CIFAR-10 needs its directory (--data DIR), or use --dataset synthetic".into(),
        ));
    }
    let split = datasets::test_split(dataset, data, test_samples).map_err(|e| EvalError::Data(e.to_string()))?;
    if split.is_empty() {
        return Err(EvalError::Data("the test set is empty".into()));
    }
    Ok(split)
}

/// Eval-mode logits (f32, CPU) of already normalised `images` (`[B, 3, 32, 32]`).
pub fn logits(model: &dyn ModuleT, images: &Tensor, device: Device) -> Tensor {
    tch::no_grad(|| model.forward_t(&images.to_device(device), false).to_kind(Kind::Float).to_device(Device::Cpu))
}

/// The normalised test images `indices` of `split`, exactly as evaluation feeds them.
pub fn images(split: &Arc<CifarSplit>, indices: Vec<usize>) -> (Tensor, Tensor) {
    let n = indices.len().max(1);
    let mut loader = Loader::new(split.clone(), indices, n, 0, 0, false, 0);
    match loader.next() {
        Some(b) => (b.images, b.labels),
        None => {
            (Tensor::zeros([0, 3, 32, 32], (Kind::Float, Device::Cpu)), Tensor::zeros([0], (Kind::Int64, Device::Cpu)))
        }
    }
}

/// `confusion[true][predicted]` counts over the whole split, in batches of [`EVAL_BATCH`].
/// The counts are kept on `device` (a `bincount` per batch) and read back once at the end,
/// so the device is not waited for after every batch.
pub fn confusion(model: &dyn ModuleT, split: &Arc<CifarSplit>, device: Device) -> Vec<Vec<u64>> {
    const CELLS: i64 = (NUM_CLASSES * NUM_CLASSES) as i64;
    let mut counts = Tensor::zeros([CELLS], (Kind::Int64, device));
    let loader = Loader::for_device(device, split.clone(), (0..split.len()).collect(), EVAL_BATCH, 0, 0, false, 0);
    let non_blocking = device.is_cuda();
    tch::no_grad(|| {
        for batch in loader {
            let images = batch.images.to_device_(device, Kind::Float, non_blocking, false);
            let truth = batch.labels.to_device_(device, Kind::Int64, non_blocking, false);
            let pred = model.forward_t(&images, false).argmax(-1, false);
            // Cell true·10 + predicted of the row-major matrix.
            let cells = truth * NUM_CLASSES as i64 + pred;
            counts += cells.bincount(None::<Tensor>, CELLS);
        }
    });
    let flat = Vec::<i64>::try_from(&counts.to_device(Device::Cpu)).expect("int64 counts");
    flat.chunks(NUM_CLASSES).map(|row| row.iter().map(|&c| c.max(0) as u64).collect()).collect()
}

/// What `cvdist-worker eval --json-out` writes (`cvdist eval` parses it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub model: String,
    pub checkpoint: String,
    pub samples: u64,
    pub accuracy: f64,
    /// Accuracy per true class (0 for a class with no test images).
    pub per_class: Vec<f64>,
    /// Row = true class, column = predicted class.
    pub confusion: Vec<Vec<u64>>,
    pub classes: Vec<String>,
}

impl EvalReport {
    pub fn from_confusion(model: &str, checkpoint: &Path, confusion: Vec<Vec<u64>>) -> EvalReport {
        let samples: u64 = confusion.iter().flatten().sum();
        let correct: u64 = (0..confusion.len()).map(|i| confusion[i][i]).sum();
        let per_class = confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: u64 = row.iter().sum();
                if n == 0 {
                    0.0
                } else {
                    row[i] as f64 / n as f64
                }
            })
            .collect();
        EvalReport {
            model: model.to_string(),
            checkpoint: checkpoint.display().to_string(),
            samples,
            accuracy: if samples == 0 { 0.0 } else { correct as f64 / samples as f64 },
            per_class,
            confusion,
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// Loads `checkpoint` and evaluates it on the test split.
pub fn evaluate_checkpoint(
    checkpoint: &Path,
    dataset: Dataset,
    data: Option<&Path>,
    test_samples: u64,
    device: Device,
) -> Result<EvalReport, EvalError> {
    let loaded = load_model(checkpoint, device)?;
    let split = test_split(dataset, data, test_samples)?;
    let m = confusion(loaded.model.as_ref(), &split, device);
    Ok(EvalReport::from_confusion(&loaded.state.model, &loaded.json, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_from_confusion() {
        let mut m = vec![vec![0u64; 10]; 10];
        m[0][0] = 3;
        m[0][1] = 1;
        m[2][2] = 4;
        let r = EvalReport::from_confusion("resnet20", Path::new("c.json"), m);
        assert_eq!(r.samples, 8);
        assert!((r.accuracy - 7.0 / 8.0).abs() < 1e-12);
        assert_eq!(r.per_class[0], 0.75);
        assert_eq!(r.per_class[1], 0.0);
        assert_eq!(r.per_class[2], 1.0);
        assert_eq!(r.classes[9], "truck");
    }

    #[test]
    fn checkpoint_paths() {
        assert_eq!(
            checkpoint_json(Path::new("d/ckpt-e0001-s000000.safetensors")),
            Path::new("d/ckpt-e0001-s000000.json")
        );
        assert_eq!(checkpoint_json(Path::new("d/ckpt-e0001-s000000.json")), Path::new("d/ckpt-e0001-s000000.json"));
    }
}
