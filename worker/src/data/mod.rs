//! The CIFAR-10 input pipeline: which images a run uses ([`datasets`]), deterministic
//! augmentation ([`augment`]) and a prefetching batch loader ([`loader`]). Reading the
//! files lives in `cvdist_common::cifar`, which does not need libtorch.

pub mod augment;
pub mod datasets;
pub mod loader;

pub use augment::{fill_batch, Augmentation};
pub use datasets::{DataError, Datasets};
pub use loader::{Batch, Loader};
