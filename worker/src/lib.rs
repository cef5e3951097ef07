//! cvdist worker: trains a CIFAR-10 model through libtorch and exchanges gradients
//! directly with its peers. The binary in `main.rs` is a thin front end over `cli`.

pub mod agent;
pub mod allocator;
pub mod cli;
pub mod collective;
pub mod data;
pub mod device;
pub mod eval;
pub mod interop;
pub mod models;
pub mod supervisor;
pub mod train;
