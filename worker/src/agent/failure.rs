//! Why a job attempt ended on this rank, classified for the coordinator.

use super::transfer::TransferError;
use crate::train::TrainError;
use cvdist_common::proto::FailureKind;

/// Why an attempt ended on this rank, and whether a restart could help.
pub(super) struct Failure {
    pub text: String,
    pub kind: FailureKind,
}

impl Failure {
    /// Lost peers, network, aborts: the coordinator may restart the group.
    pub fn retry(text: impl Into<String>) -> Failure {
        Failure { text: text.into(), kind: FailureKind::Retryable }
    }

    /// The same assignment would fail again in the same way.
    pub fn config(text: impl Into<String>) -> Failure {
        Failure { text: text.into(), kind: FailureKind::Configuration }
    }

    /// A coordinator that has no dataset to serve (or serves a broken one) will answer the
    /// same way on every retry; a network failure may not recur.
    pub fn dataset_fetch(e: &TransferError) -> Failure {
        let text = format!("fetching the dataset from the coordinator: {e}");
        match e {
            TransferError::Rpc { code: tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument, .. } => {
                Failure { text, kind: FailureKind::Data }
            }
            _ => Failure::retry(text),
        }
    }
}

impl From<TrainError> for Failure {
    fn from(e: TrainError) -> Failure {
        Failure { kind: e.failure_kind(), text: e.to_string() }
    }
}
