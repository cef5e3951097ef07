//! Types shared by the cvdist coordinator, workers and CLI. Nothing here links libtorch,
//! so the control plane stays small.

pub mod args;
pub mod atomic_file;
pub mod auth;
pub mod checkpoint;
pub mod choices;
pub mod cifar;
pub mod client;
pub mod convert;
pub mod download;
pub mod epoch_sums;
pub mod models;
pub mod names;
pub mod nonfinite;
pub mod rejoin;
pub mod run_dir;
pub mod sampler;
pub mod spec;
pub mod tensorboard;
pub mod term;
pub mod text;
pub mod version;

/// Generated gRPC/protobuf code for package `cvdist.v1` (see `proto/cvdist.proto`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("cvdist.v1");
}
