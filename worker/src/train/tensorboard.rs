//! TensorBoard event files for `cvdist-worker train --tensorboard DIR`: the writer lives in
//! `cvdist_common::tensorboard` (no libtorch), so the coordinator writes the same format into
//! every job's run directory; re-exported here for the worker's existing callers.

pub use cvdist_common::tensorboard::*;
