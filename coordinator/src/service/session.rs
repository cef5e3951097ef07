//! `WorkerSession`: a worker's registration (or re-registration into the attempt it runs),
//! then its heartbeats and reports in, assignments and aborts out, until either side ends it.

use super::BoxStream;
use crate::state::Coordinator;
use cvdist_common::proto::{worker_message, CoordinatorMessage, WorkerMessage};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Status, Streaming};
use tracing::warn;

const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Registers the session from its first message and serves the rest on a task of its own;
/// returns the stream of messages to the worker.
pub(super) async fn open(
    state: &Arc<Coordinator>,
    mut inbound: Streaming<WorkerMessage>,
) -> Result<BoxStream<CoordinatorMessage>, Status> {
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no registration within 10 s"))??
        .ok_or_else(|| Status::invalid_argument("session closed before registering"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (id, session) = match first.msg {
        Some(worker_message::Msg::Register(register)) => state.register(register, tx)?,
        // A worker that kept training while its session was down.
        Some(worker_message::Msg::Rejoin(rejoin)) => state.rejoin(rejoin, tx)?,
        _ => return Err(Status::invalid_argument("the first message of a worker session must be a registration")),
    };
    let state = state.clone();
    let closing = state.closing();
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
    Ok(Box::pin(UnboundedReceiverStream::new(rx)))
}
