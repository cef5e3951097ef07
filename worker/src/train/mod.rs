//! Training: the per-rank loop, optimizer, schedule, checkpoints and rank synchronisation.

pub mod buckets;
pub mod checkpoint;
mod checkpointing;
pub mod ckpt_writer;
pub mod divergence;
pub mod engine;
pub mod error;
pub mod exact_gather;
pub mod live_state;
pub mod metrics;
pub mod observer;
pub mod overlap;
pub mod position;
pub mod precision;
pub mod reduction_audit;
mod resume;
pub mod scaler;
pub mod schedule;
pub mod sgd;
pub mod sync;
pub mod sync_bn;
pub mod trainer;

pub use engine::Engine;
pub use error::TrainError;
pub use observer::{NoObserver, Observer};
pub use trainer::{train, train_from, TrainOutcome, TrainerConfig};
