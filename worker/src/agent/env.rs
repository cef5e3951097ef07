//! What a job's thread gets from the worker it runs on.

use crate::train::live_state::LiveSlot;
use cvdist_common::client::Client;
use cvdist_common::proto::WorkerMessage;
use std::path::PathBuf;
use tch::Device;
use tokio::sync::mpsc;

/// The worker's resources one job runs with: its device and data, its scratch space, the
/// data-plane listener, the way to the coordinator and the memory kept across attempts.
pub struct JobEnv {
    pub device: Device,
    pub data: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// The id the coordinator registered this worker under: names its own scratch folder.
    pub worker_id: String,
    pub listener: std::net::TcpListener,
    pub client: Client,
    pub runtime: tokio::runtime::Handle,
    pub outbox: mpsc::UnboundedSender<WorkerMessage>,
    /// The session that holds this job now (it can change while the job trains, since a
    /// job outlives the session it was assigned on): checkpoint uploads go through it.
    pub link: super::link::SessionLink,
    /// The training state a failed attempt of this worker left, so the next attempt can
    /// continue from memory instead of a checkpoint.
    pub live: LiveSlot,
}
