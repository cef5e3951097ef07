//! Which images a run trains and evaluates on: CIFAR-10 from a directory, or the generated
//! synthetic set, cut to the first N images when a job asks for a subset. Training
//! (`Datasets::for_spec`) and `cvdist eval` (`test_split`) go through here, so an
//! evaluation sees exactly the test images training evaluated on.

use cvdist_common::choices::Dataset;
use cvdist_common::cifar::{self, CifarSplit};
use cvdist_common::proto::JobSpec;
use std::path::Path;
use std::sync::Arc;

/// Seeds of the generated synthetic splits (fixed: every machine generates the same images).
const SYNTHETIC_TRAIN_SEED: u64 = 1;
const SYNTHETIC_TEST_SEED: u64 = 2;

/// Every error is one self-contained line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    #[error("the job uses CIFAR-10 but no data directory was given (--data DIR)")]
    NoDataDir,
    /// The files could not be read or are not CIFAR-10 (the reader's message).
    #[error("{0}")]
    Read(String),
    /// A job spec naming a dataset this worker does not know.
    #[error(transparent)]
    Spec(#[from] cvdist_common::choices::ChoiceError),
}

/// Train and test splits, already cut to the job's subset sizes.
#[derive(Clone)]
pub struct Datasets {
    pub train: Arc<CifarSplit>,
    pub test: Arc<CifarSplit>,
}

impl Datasets {
    /// Loads what `spec` asks for: CIFAR-10 from `data_dir`, or generated synthetic data.
    pub fn for_spec(spec: &JobSpec, data_dir: Option<&Path>) -> Result<Datasets, DataError> {
        let dataset: Dataset = spec.dataset.parse()?;
        Ok(Datasets {
            train: Arc::new(cut(load(dataset, Split::Train, data_dir)?, spec.train_samples)),
            test: Arc::new(cut(load(dataset, Split::Test, data_dir)?, spec.test_samples)),
        })
    }
}

/// The test split of `dataset`, cut to the first `samples` images (0 = all): the images
/// training evaluates on for a job with `--test-samples samples`.
pub fn test_split(dataset: Dataset, data_dir: Option<&Path>, samples: u64) -> Result<Arc<CifarSplit>, DataError> {
    Ok(Arc::new(cut(load(dataset, Split::Test, data_dir)?, samples)))
}

#[derive(Clone, Copy)]
enum Split {
    Train,
    Test,
}

fn load(dataset: Dataset, split: Split, data_dir: Option<&Path>) -> Result<CifarSplit, DataError> {
    let (train_len, test_len) = dataset.sizes();
    match dataset {
        Dataset::Synthetic => Ok(match split {
            Split::Train => cifar::synthetic(train_len as usize, SYNTHETIC_TRAIN_SEED),
            Split::Test => cifar::synthetic(test_len as usize, SYNTHETIC_TEST_SEED),
        }),
        Dataset::Cifar10 => {
            let dir = data_dir.ok_or(DataError::NoDataDir)?;
            match split {
                Split::Train => cifar::load_train(dir),
                Split::Test => cifar::load_test(dir),
            }
            .map_err(|e| DataError::Read(e.to_string()))
        }
    }
}

/// The first `n` images of `split` (0 or more than it has: all of them).
fn cut(split: CifarSplit, n: u64) -> CifarSplit {
    if n == 0 || n as usize >= split.len() {
        split
    } else {
        split.take(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evaluation's test split is the one training uses for the same subset size.
    #[test]
    fn eval_sees_the_test_images_training_sees() {
        let mut spec = cvdist_common::spec::default_spec("resnet20", 1);
        spec.dataset = Dataset::Synthetic.to_string();
        spec.train_samples = 100;
        spec.test_samples = 30;
        let d = Datasets::for_spec(&spec, None).unwrap();
        let t = test_split(Dataset::Synthetic, None, 30).unwrap();
        assert_eq!((d.train.len(), d.test.len(), t.len()), (100, 30, 30));
        assert_eq!(d.test.labels(), t.labels());
        assert!((0..30).all(|i| d.test.image(i) == t.image(i)));
        assert_eq!(test_split(Dataset::Synthetic, None, 0).unwrap().len(), 1_000);
        assert_eq!(test_split(Dataset::Cifar10, None, 0).unwrap_err(), DataError::NoDataDir);
    }
}
