//! The one place a refusal of the coordinator's state becomes a gRPC status, and the status of
//! a failed file operation.

use crate::state::CoordinatorError;
use tonic::{Code, Status};

/// The variant picks the code, its text is the message.
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

/// A file operation on `path` failed: RESOURCE_EXHAUSTED for a full disk (ENOSPC), INTERNAL
/// otherwise.
pub(super) fn io_status(path: &std::path::Path, e: std::io::Error) -> Status {
    if e.raw_os_error() == Some(28) {
        return Status::resource_exhausted(format!("{}: disk full", path.display()));
    }
    Status::internal(format!("{}: {e}", path.display()))
}
