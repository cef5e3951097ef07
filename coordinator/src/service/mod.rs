//! The gRPC service: translates RPCs into calls on the [`Coordinator`] state machine and
//! moves checkpoints and the dataset in checksummed chunks. Each RPC checks the caller's role
//! here ([`require`]) and hands over to the module of its concept: `watch` (a job's event
//! stream), `session` (a worker's session stream), `checkpoints` (upload and download),
//! `dataset` (the CIFAR-10 files); `status` turns the state's refusals into gRPC statuses.
//!
//! A [`Coordinator`] method that changes a job commits its record to redb before it returns,
//! and one that answers a client waits until what it shows is committed; both can wait for
//! other callers' commits ([`crate::state::effects::Committer`]). Such calls run on tokio's
//! blocking pool ([`on_state`]), so that the runtime's worker threads keep serving every other
//! stream meanwhile. Calls that only read under the state's lock (heartbeats, the worker list,
//! the upload check) stay on the runtime: the lock is never held across a write or a wait.

use crate::auth::{require, Role};
use crate::state::Coordinator;
use cvdist_common::proto::coordinator_server::Coordinator as CoordinatorApi;
use cvdist_common::proto::{
    CancelJobRequest, CheckpointChunk, CoordinatorMessage, DatasetChunk, DownloadCheckpointRequest,
    FetchDatasetRequest, GetJobRequest, JobEvent, JobInfo, ListJobsRequest, ListJobsResponse, ListWorkersRequest,
    ListWorkersResponse, SubmitJobRequest, SubmitJobResponse, UploadCheckpointResponse, WatchJobRequest, WorkerMessage,
};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

mod checkpoints;
mod dataset;
mod session;
mod status;
mod watch;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct Service {
    pub state: Arc<Coordinator>,
    /// CIFAR-10 copy served to workers that have none.
    pub data_dir: Option<PathBuf>,
    /// Checkpoints kept per job (`--keep-checkpoints`; 0 keeps all): see
    /// [`crate::store::Store::prune_checkpoints`].
    pub keep_checkpoints: usize,
    /// An upload that sends nothing for this long is dropped (with its temp file).
    pub upload_idle_timeout: Duration,
}

#[tonic::async_trait]
impl CoordinatorApi for Service {
    async fn submit_job(&self, req: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        require(&req, Role::Client)?;
        let spec = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("SubmitJobRequest.spec is missing"))?;
        let job_id = on_state(&self.state, move |s| s.submit(spec)).await??;
        Ok(Response::new(SubmitJobResponse { job_id }))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        require(&req, Role::Client)?;
        Ok(Response::new(ListJobsResponse { jobs: on_state(&self.state, |s| s.list()).await?? }))
    }

    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        require(&req, Role::Client)?;
        Ok(Response::new(ListWorkersResponse { workers: self.state.workers() }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        require(&req, Role::Client)?;
        let id = req.into_inner().job_id;
        Ok(Response::new(on_state(&self.state, move |s| s.get(&id)).await??))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<JobInfo>, Status> {
        require(&req, Role::Client)?;
        let id = req.into_inner().job_id;
        Ok(Response::new(on_state(&self.state, move |s| s.cancel(&id)).await??))
    }

    type WatchJobStream = BoxStream<JobEvent>;

    async fn watch_job(&self, req: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        require(&req, Role::Client)?;
        let id = req.into_inner().job_id;
        let (snapshot, rx) = on_state(&self.state, move |s| s.watch(&id)).await??;
        Ok(Response::new(watch::stream(snapshot, rx, self.state.closing())))
    }

    type WorkerSessionStream = BoxStream<CoordinatorMessage>;

    async fn worker_session(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::WorkerSessionStream>, Status> {
        require(&req, Role::Worker)?;
        Ok(Response::new(session::open(&self.state, req.into_inner()).await?))
    }

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<CheckpointChunk>>,
    ) -> Result<Response<UploadCheckpointResponse>, Status> {
        require(&req, Role::Worker)?;
        self.upload(req.into_inner()).await.map(Response::new)
    }

    type DownloadCheckpointStream = BoxStream<CheckpointChunk>;

    async fn download_checkpoint(
        &self,
        req: Request<DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        require(&req, Role::Worker)?;
        self.download(req.into_inner()).await.map(Response::new)
    }

    type FetchDatasetStream = BoxStream<DatasetChunk>;

    async fn fetch_dataset(
        &self,
        req: Request<FetchDatasetRequest>,
    ) -> Result<Response<Self::FetchDatasetStream>, Status> {
        require(&req, Role::Worker)?;
        dataset::stream(self.data_dir.as_deref(), &req.into_inner().dataset).await.map(Response::new)
    }
}

/// Runs `call` on the coordinator's state on tokio's blocking pool and waits for it. The
/// caller goes on only once it has returned, so calls made one after another (a session's
/// messages) still reach the state in that order.
async fn on_state<T, F>(state: &Arc<Coordinator>, call: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&Coordinator) -> T + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || call(&state))
        .await
        .map_err(|e| Status::internal(format!("the coordinator's state call did not complete: {e}")))
}

/// Reads until `buf` is full or the file ends; returns how many bytes it read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
