//! `WatchJob`: the job's snapshot, then its events as they become durable, until the job ends,
//! the watcher leaves or the coordinator shuts down.

use super::BoxStream;
use crate::state::Subscription;
use cvdist_common::proto::{job_event, JobEvent, JobInfo};
use std::future::Future;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

/// The watcher's stream: `snapshot` first, then what `rx` delivers; `closing` ends it.
pub(super) fn stream(
    snapshot: JobInfo,
    rx: Option<Subscription>,
    closing: impl Future<Output = ()> + Send + 'static,
) -> BoxStream<JobEvent> {
    let (tx, out) = mpsc::channel::<Result<JobEvent, Status>>(256);
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
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}
