//! cvdist control plane: the coordinator service and the client side of the `cvdist`
//! command. Nothing here links libtorch.

pub mod auth;
pub mod cli;
pub mod follow;
pub mod local;
pub mod report;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
