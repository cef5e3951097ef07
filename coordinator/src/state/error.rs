//! Why the coordinator refused a request, as a type of its own: the state machine, the worker
//! registry and the store know nothing of gRPC, and `service/status.rs` turns each variant into a
//! `tonic::Status` in one place. Each variant's text is the message the caller sees (tests and
//! scripts match on it), so change the wording only together with them.

use crate::store::StoreError;
use cvdist_common::run_dir::RunDirError;
use cvdist_common::text;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The submitted job spec fails validation (`spec::validate`); the text names the field.
    #[error("{0}")]
    InvalidSpec(String),
    #[error("a job named {0:?} already exists")]
    NameTaken(String),
    #[error("no job with id {}; `cvdist jobs` lists them", text::quoted(.0))]
    NoSuchJob(String),
    /// `CancelJob` of a job in a terminal state.
    #[error("job {id} already ended ({state})")]
    AlreadyEnded { id: String, state: &'static str },
    /// A worker's report about a job in a terminal state.
    #[error("job {0} already ended")]
    ReportAfterEnd(String),
    #[error("worker speaks protocol version {worker} but this coordinator speaks {ours}; run the same cvdist release on both")]
    ProtocolMismatch { worker: u32, ours: u32 },
    /// A registration with a malformed worker id or data-plane address.
    #[error("{0}")]
    InvalidWorker(String),
    #[error("coordinator is shutting down")]
    ShuttingDown,
    #[error("a worker with id {0:?} is already connected; ids must be unique (a restarted worker may retry once the old session times out)")]
    DuplicateWorker(String),
    /// A re-registration whose proof does not match the attempt it claims.
    #[error("re-registration refused: {0}")]
    RejoinRefused(String),
    #[error("worker session closed while registering")]
    SessionClosedWhileRegistering,
    #[error("report from a closed session of worker {0}")]
    ClosedSession(String),
    /// A progress or epoch report past the job's last epoch (`what` says which).
    #[error("{what} for epoch {epoch}, but job {job} has {epochs} epochs (0-based)")]
    EpochOutOfRange { what: &'static str, epoch: u32, job: String, epochs: u32 },
    #[error("empty job report")]
    EmptyReport,
    /// A checkpoint name that is not `ckpt-eEEEE-sSSSSSS`.
    #[error("{0}")]
    BadCheckpointName(String),
    /// A checkpoint upload the job cannot take now; `why` says which rule it breaks.
    #[error("checkpoint for job {job_id} refused: {why}")]
    CheckpointRefused { job_id: String, why: String },
    #[error("job {job_id} has an unknown model {}", text::quoted(.model))]
    UnknownModel { job_id: String, model: String },
    /// The job database could not be written or read.
    #[error("coordinator storage error: {0}")]
    Storage(#[from] StoreError),
    /// The job's run directory could not be written.
    #[error("{0}")]
    RunDir(#[from] RunDirError),
}
