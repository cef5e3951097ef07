//! `WorkerSession`: a worker's registration (or re-registration into the attempt it runs),
//! then its heartbeats and reports in, assignments and aborts out, until either side ends it.

use super::{on_state, BoxStream};
use crate::state::{Coordinator, WorkerTx};
use cvdist_common::proto::{worker_message, CoordinatorMessage, WorkerMessage};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
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
    let (answer, registered) = oneshot::channel();
    let state = state.clone();
    // Registration runs in the session's task, not in this handler, which is dropped when the
    // caller hangs up: a session that registered always reaches `session_closed`.
    tokio::spawn(async move {
        let (id, session) = match register(&state, first.msg, tx).await {
            Ok(registered) => {
                let _ = answer.send(Ok(()));
                registered
            }
            Err(e) => {
                let _ = answer.send(Err(e));
                return;
            }
        };
        serve(state, inbound, id, session).await;
    });
    registered.await.map_err(|_| Status::internal("the worker session ended while registering"))??;
    Ok(Box::pin(UnboundedReceiverStream::new(rx)))
}

/// Registers the worker its first message names; returns its id and session number.
async fn register(
    state: &Arc<Coordinator>,
    first: Option<worker_message::Msg>,
    tx: WorkerTx,
) -> Result<(String, u64), Status> {
    match first {
        Some(worker_message::Msg::Register(register)) => Ok(on_state(state, move |s| s.register(register, tx)).await??),
        // A worker that kept training while its session was down.
        Some(worker_message::Msg::Rejoin(rejoin)) => Ok(on_state(state, move |s| s.rejoin(rejoin, tx)).await??),
        _ => Err(Status::invalid_argument("the first message of a worker session must be a registration")),
    }
}

/// Hands the worker's heartbeats and reports to the state until the session ends, then
/// ends it there.
async fn serve(state: Arc<Coordinator>, mut inbound: Streaming<WorkerMessage>, id: String, session: u64) {
    let closing = state.closing();
    tokio::pin!(closing);
    let why = loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            // Dropping `inbound` ends our half of the stream, so the server's
            // graceful shutdown need not wait for the worker to hang up.
            _ = &mut closing => break "coordinator shutting down".to_string(),
        };
        match next {
            Ok(Some(WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(_)) })) => state.heartbeat(&id, session),
            Ok(Some(WorkerMessage { msg: Some(worker_message::Msg::Report(r)) })) => {
                state.heartbeat(&id, session);
                let worker = id.clone();
                match on_state(&state, move |s| s.report(&worker, session, r)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(worker = %id, error = %e, "report refused"),
                    Err(e) => warn!(worker = %id, error = %e.message(), "report not applied"),
                }
            }
            Ok(Some(_)) => break "protocol error: unexpected message".to_string(),
            Ok(None) => break "session closed".to_string(),
            Err(e) => break format!("session error: {}", e.message()),
        }
    };
    let worker = id.clone();
    if let Err(e) = on_state(&state, move |s| s.session_closed(&worker, session, &why)).await {
        warn!(worker = %id, error = %e.message(), "the end of the session was not applied");
    }
}
