//! The gRPC service: translates RPCs into calls on the [`Coordinator`] state machine and
//! moves checkpoints and the dataset in checksummed chunks.

use crate::server::Role;
use crate::state::{Coordinator, CoordinatorError, UploadClaim, UploadStage};
use cvdist_common::atomic_file::AtomicFile;
use cvdist_common::checkpoint::CheckpointState;
use cvdist_common::proto::coordinator_server::Coordinator as CoordinatorApi;
use cvdist_common::proto::{
    job_event, worker_message, CancelJobRequest, CheckpointChunk, CoordinatorMessage, DatasetChunk,
    DownloadCheckpointRequest, FetchDatasetRequest, GetJobRequest, JobEvent, JobInfo, ListJobsRequest,
    ListJobsResponse, ListWorkersRequest, ListWorkersResponse, SubmitJobRequest, SubmitJobResponse,
    UploadCheckpointResponse, WatchJobRequest, WorkerMessage,
};
use cvdist_common::{cifar, names, text, version};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{info, warn};

const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest checkpoint state record (epoch, step, sums, checksum: a few hundred bytes).
const MAX_STATE_JSON: usize = 64 * 1024;

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

/// What a checkpoint upload said about itself, for the log line of a refusal.
#[derive(Default)]
struct UploadLabel {
    job_id: String,
    name: String,
    attempt: u32,
}

/// Refuses a request whose credential is for the other role (see `server::Role`).
fn require<T>(req: &Request<T>, want: Role) -> Result<(), Status> {
    match (req.extensions().get::<Role>(), want) {
        (Some(Role::Any), _) => Ok(()),
        (Some(have), want) if *have == want => Ok(()),
        (Some(Role::Client), Role::Worker) => Err(Status::permission_denied(
            "the client token cannot act as a worker: workers authenticate with the worker credential (CVDIST_WORKER_TOKEN or --worker-token-file)",
        )),
        (Some(_), _) => Err(Status::permission_denied(
            "the worker credential cannot manage jobs: use the client token (CVDIST_TOKEN or --token-file)",
        )),
        (None, _) => Err(Status::permission_denied("request carries no role (not authenticated by this server)")),
    }
}

/// The next chunk of an upload, or an error once the stream has been idle too long.
async fn next_chunk(
    chunks: &mut Streaming<CheckpointChunk>,
    idle: Duration,
) -> Result<Option<CheckpointChunk>, Status> {
    tokio::time::timeout(idle, chunks.message()).await.map_err(|_| {
        Status::deadline_exceeded(format!("checkpoint upload sent nothing for {:.0} s; dropped", idle.as_secs_f64()))
    })?
}

/// The one place a refusal of the coordinator's state becomes a gRPC status: the variant
/// picks the code, its text is the message.
impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        use CoordinatorError as E;
        let code = match &e {
            E::InvalidSpec(_)
            | E::InvalidWorker(_)
            | E::EpochOutOfRange { .. }
            | E::EmptyReport
            | E::BadCheckpointName(_) => Code::InvalidArgument,
            E::NameTaken(_) | E::DuplicateWorker(_) => Code::AlreadyExists,
            E::NoSuchJob(_) => Code::NotFound,
            E::AlreadyEnded { .. } | E::ReportAfterEnd(_) | E::ProtocolMismatch { .. } | E::UnknownModel { .. } => {
                Code::FailedPrecondition
            }
            E::ShuttingDown => Code::Unavailable,
            E::SessionClosedWhileRegistering => Code::Cancelled,
            E::ClosedSession(_) | E::CheckpointRefused { .. } | E::RejoinRefused(_) => Code::PermissionDenied,
            E::Storage(_) | E::RunDir(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

fn checkpoint_name(name: &str) -> Result<(u32, u64), Status> {
    names::parse_checkpoint_name(name).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl CoordinatorApi for Service {
    async fn submit_job(&self, req: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        require(&req, Role::Client)?;
        let spec = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("SubmitJobRequest.spec is missing"))?;
        let job_id = self.state.submit(spec)?;
        Ok(Response::new(SubmitJobResponse { job_id }))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        require(&req, Role::Client)?;
        Ok(Response::new(ListJobsResponse { jobs: self.state.list()? }))
    }

    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        require(&req, Role::Client)?;
        Ok(Response::new(ListWorkersResponse { workers: self.state.workers() }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        require(&req, Role::Client)?;
        Ok(Response::new(self.state.get(&req.into_inner().job_id)?))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<JobInfo>, Status> {
        require(&req, Role::Client)?;
        Ok(Response::new(self.state.cancel(&req.into_inner().job_id)?))
    }

    type WatchJobStream = BoxStream<JobEvent>;

    async fn watch_job(&self, req: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        require(&req, Role::Client)?;
        let (snapshot, rx) = self.state.watch(&req.into_inner().job_id)?;
        let (tx, out) = mpsc::channel::<Result<JobEvent, Status>>(256);
        let closing = self.state.closing();
        tokio::spawn(async move {
            tokio::pin!(closing);
            let done = snapshot.state().is_terminal();
            if tx.send(Ok(JobEvent { event: Some(job_event::Event::Snapshot(snapshot)) })).await.is_err() || done {
                return;
            }
            // Only an ended job comes without a subscription, and that returned above.
            let Some(mut rx) = rx else { return };
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    // Watchers reconnect to the restarted coordinator (`cvdist --follow` does).
                    _ = &mut closing => {
                        let _ = tx.try_send(Err(Status::unavailable("coordinator is shutting down")));
                        return;
                    }
                };
                match next {
                    Ok(ev) => {
                        let end = matches!(&ev.event, Some(job_event::Event::Snapshot(s)) if s.state().is_terminal());
                        if tx.send(Ok(ev)).await.is_err() || end {
                            return;
                        }
                    }
                    // A slow watcher misses some progress lines rather than slowing the job.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    type WorkerSessionStream = BoxStream<CoordinatorMessage>;

    async fn worker_session(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::WorkerSessionStream>, Status> {
        require(&req, Role::Worker)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no registration within 10 s"))??
            .ok_or_else(|| Status::invalid_argument("session closed before registering"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (id, session) = match first.msg {
            Some(worker_message::Msg::Register(register)) => self.state.register(register, tx)?,
            // A worker that kept training while its session was down.
            Some(worker_message::Msg::Rejoin(rejoin)) => self.state.rejoin(rejoin, tx)?,
            _ => return Err(Status::invalid_argument("the first message of a worker session must be a registration")),
        };
        let state = self.state.clone();
        let closing = self.state.closing();
        tokio::spawn(async move {
            tokio::pin!(closing);
            let why = loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    // Dropping `inbound` ends our half of the stream, so the server's
                    // graceful shutdown need not wait for the worker to hang up.
                    _ = &mut closing => break "coordinator shutting down".to_string(),
                };
                match next {
                    Ok(Some(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(_)) })) => {
                        state.heartbeat(&id, session)
                    }
                    Ok(Some(WorkerMessage { msg: Some(worker_message::Msg::Report(r)) })) => {
                        state.heartbeat(&id, session);
                        if let Err(e) = state.report(&id, session, r) {
                            warn!(worker = %id, error = %e, "report refused");
                        }
                    }
                    Ok(Some(_)) => break "protocol error: unexpected message".to_string(),
                    Ok(None) => break "session closed".to_string(),
                    Err(e) => break format!("session error: {}", e.message()),
                }
            };
            state.session_closed(&id, session, &why);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<CheckpointChunk>>,
    ) -> Result<Response<UploadCheckpointResponse>, Status> {
        require(&req, Role::Worker)?;
        let mut label = UploadLabel::default();
        let result = self.store_checkpoint(req.into_inner(), &mut label).await;
        match &result {
            Ok(stored) => {
                // Older checkpoints go only now, with the newer one durably stored.
                let latest = self.state.get(&label.job_id).map(|j| j.latest_checkpoint).unwrap_or_default();
                for (name, e) in self.state.store().prune_checkpoints(&label.job_id, self.keep_checkpoints, &latest) {
                    match e {
                        None => {
                            info!(job = %label.job_id, checkpoint = %name, keep = self.keep_checkpoints, "older checkpoint deleted")
                        }
                        Some(e) => {
                            warn!(job = %label.job_id, checkpoint = %name, error = %e, "could not delete an older checkpoint")
                        }
                    }
                }
                info!(job = %label.job_id, name = %stored.name, bytes = stored.bytes, "checkpoint stored");
            }
            // Every refusal is logged here, whatever refused it: a worker only logs its
            // side, and an operator must see on the coordinator why checkpoints are missing.
            Err(status) => {
                // Debug formatting: the names come from the uploader and may hold anything.
                warn!(job = ?label.job_id, checkpoint = ?label.name, attempt = label.attempt, code = ?status.code(),
                    reason = %status.message(), "checkpoint upload refused");
                if !label.job_id.is_empty() {
                    let reason = format!("{:?}: {}", status.code(), status.message());
                    self.state.checkpoint_refused(&label.job_id, label.attempt, &label.name, &reason);
                }
            }
        }
        result.map(Response::new)
    }

    type DownloadCheckpointStream = BoxStream<CheckpointChunk>;

    async fn download_checkpoint(
        &self,
        req: Request<DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        require(&req, Role::Worker)?;
        let req = req.into_inner();
        checkpoint_name(&req.name)?;
        self.state.get(&req.job_id)?;
        let dir = self.state.store().checkpoint_dir(&req.job_id);
        let json_path = dir.join(format!("{}.json", req.name));
        let json = tokio::fs::read(&json_path).await.map_err(|e| {
            Status::not_found(format!("checkpoint {} of job {}: {e}", req.name, text::quoted(&req.job_id)))
        })?;
        let state = CheckpointState::from_json(&json)
            .map_err(|e| Status::data_loss(format!("{}: {e}", json_path.display())))?;
        let state = cvdist_common::proto::CheckpointState::from(&state);
        let data_path = dir.join(format!("{}.safetensors", req.name));
        let file = tokio::fs::File::open(&data_path).await.map_err(|e| io_status(&data_path, e))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut file = file;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; version::CHUNK_BYTES];
                let n = match read_full(&mut file, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                buf.truncate(n);
                let chunk = CheckpointChunk {
                    job_id: req.job_id.clone(),
                    name: req.name.clone(),
                    state: if first { Some(state.clone()) } else { None },
                    data: buf,
                    attempt: 0,
                    session_key: String::new(),
                };
                if (n == 0 && !first) || tx.send(Ok(chunk)).await.is_err() || n < version::CHUNK_BYTES {
                    return;
                }
                first = false;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type FetchDatasetStream = BoxStream<DatasetChunk>;

    async fn fetch_dataset(
        &self,
        req: Request<FetchDatasetRequest>,
    ) -> Result<Response<Self::FetchDatasetStream>, Status> {
        require(&req, Role::Worker)?;
        let req = req.into_inner();
        let served = cvdist_common::choices::Dataset::Cifar10.as_str();
        if req.dataset != served {
            return Err(Status::invalid_argument(format!(
                "unknown dataset {}; only \"{served}\" is served",
                text::quoted(&req.dataset)
            )));
        }
        let dir = self.data_dir.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator has no dataset to serve; start it with --data DIR or give workers --data",
            )
        })?;
        let batches = cifar::batches_dir(&dir);
        let mut files: Vec<&str> = cifar::TRAIN_FILES.to_vec();
        files.push(cifar::TEST_FILE);
        for f in &files {
            if !batches.join(f).is_file() {
                return Err(Status::failed_precondition(format!(
                    "coordinator's dataset is incomplete: {} missing",
                    batches.join(f).display()
                )));
            }
        }
        let (tx, rx) = mpsc::channel(4);
        let names: Vec<String> = files.iter().map(|s| s.to_string()).collect();
        tokio::spawn(async move {
            for name in names {
                let path = batches.join(&name);
                let mut file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx.send(Err(io_status(&path, e))).await;
                        return;
                    }
                };
                let mut whole = Sha256::new();
                let mut offset = 0u64;
                loop {
                    let mut buf = vec![0u8; version::CHUNK_BYTES];
                    let n = match read_full(&mut file, &mut buf).await {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(io_status(&path, e))).await;
                            return;
                        }
                    };
                    buf.truncate(n);
                    whole.update(&buf);
                    let last = n < version::CHUNK_BYTES;
                    let chunk = DatasetChunk {
                        file: name.clone(),
                        offset,
                        chunk_sha256: hex::encode(Sha256::digest(&buf)),
                        file_sha256: if last { hex::encode(whole.clone().finalize()) } else { String::new() },
                        data: buf,
                        last_of_file: last,
                    };
                    offset += n as u64;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    if last {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

impl Service {
    /// Receives, verifies and stores one uploaded checkpoint; `label` is filled in as soon
    /// as the upload names its job, checkpoint and attempt.
    async fn store_checkpoint(
        &self,
        mut chunks: Streaming<CheckpointChunk>,
        label: &mut UploadLabel,
    ) -> Result<UploadCheckpointResponse, Status> {
        let idle = self.upload_idle_timeout;
        let first =
            next_chunk(&mut chunks, idle).await?.ok_or_else(|| Status::invalid_argument("empty checkpoint upload"))?;
        *label = UploadLabel { job_id: first.job_id.clone(), name: first.name.clone(), attempt: first.attempt };
        let pos = checkpoint_name(&first.name)?;
        let state_bytes = first.state.as_ref().map_or(0, prost::Message::encoded_len);
        if state_bytes > MAX_STATE_JSON {
            return Err(Status::invalid_argument(format!(
                "checkpoint state of {state_bytes} bytes exceeds {MAX_STATE_JSON}"
            )));
        }
        let state =
            CheckpointState::try_from(first.state.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if (state.epoch, state.step) != pos {
            return Err(Status::invalid_argument(format!(
                "checkpoint {} declares epoch {} step {}, not the position its name encodes",
                first.name, state.epoch, state.step
            )));
        }
        let claim = UploadClaim {
            job_id: first.job_id.clone(),
            attempt: first.attempt,
            session_key: first.session_key.clone(),
            name: first.name.clone(),
        };
        let limit = self.state.accepts_checkpoint(&claim, UploadStage::Started)?;
        let want_sha = state.sha256.clone();
        let dir = self.state.store().checkpoint_dir(&first.job_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_status(&dir, e))?;
        // One temp file per upload (`.NAME.safetensors.<random>.upload`): two uploads of one
        // name must not write into each other. Dropped uncommitted, it is deleted.
        let final_path = dir.join(format!("{}.safetensors", first.name));
        let dest = final_path.clone();
        let mut file = Some(
            tokio::task::spawn_blocking(move || AtomicFile::create_with_suffix(&dest, ".upload"))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| io_status(&dir, e))?,
        );
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut chunk = Some(first.clone());
        let result: Result<(), Status> = async {
            while let Some(c) = chunk {
                total += c.data.len() as u64;
                if total > limit {
                    return Err(Status::resource_exhausted(format!(
                        "checkpoint {} exceeds {limit} bytes, the most a checkpoint of this job's model can take",
                        first.name
                    )));
                }
                hasher.update(&c.data);
                let Some(mut f) = file.take() else { return Err(Status::internal("upload file lost")) };
                let (f, written) = tokio::task::spawn_blocking(move || {
                    let r = f.write_all(&c.data);
                    (f, r)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
                written.map_err(|e| io_status(f.temp_path(), e))?;
                file = Some(f);
                chunk = next_chunk(&mut chunks, idle).await?;
            }
            let got = hex::encode(hasher.finalize_reset());
            if got != want_sha {
                return Err(Status::data_loss(format!(
                    "checkpoint {} checksum {got} != declared {}",
                    first.name,
                    text::bound(&want_sha, 80)
                )));
            }
            // The uploader must still hold rank 0 of this attempt, and by now its report of
            // the epoch's last step has arrived.
            self.state.accepts_checkpoint(&claim, UploadStage::Complete)?;
            let Some(f) = file.take() else { return Err(Status::internal("upload file lost")) };
            let tmp = f.temp_path().to_path_buf();
            tokio::task::spawn_blocking(move || f.commit())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| io_status(&tmp, e))
        }
        .await;
        // On an error the uncommitted temp file is deleted here.
        drop(file);
        result?;
        let json_path = dir.join(format!("{}.json", first.name));
        let json_bytes = state.to_json();
        let jp = json_path.clone();
        let written = tokio::task::spawn_blocking(move || cvdist_common::atomic_file::write(&jp, &json_bytes))
            .await
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|r| r.map_err(|e| io_status(&json_path, e)));
        if let Err(e) = written {
            // Without its JSON commit record the tensor file is an orphan nothing reads.
            let _ = tokio::fs::remove_file(&final_path).await;
            return Err(e);
        }
        self.state.checkpoint_stored(&claim)?;
        Ok(UploadCheckpointResponse { name: first.name, bytes: total })
    }
}

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

fn io_status(path: &std::path::Path, e: std::io::Error) -> Status {
    if e.raw_os_error() == Some(28) {
        return Status::resource_exhausted(format!("{}: disk full", path.display()));
    }
    Status::internal(format!("{}: {e}", path.display()))
}
