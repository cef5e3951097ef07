//! The handle through which the session loop stops a running job.

use crate::collective::AbortHandle;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// What a running job shares with the session loop, so an abort can reach it: the
/// training loop polls `stop`, the communicator (and a ring still connecting) is cut by
/// `abort`, and transfers through the coordinator wait on `wake`.
#[derive(Clone, Default)]
pub struct JobControl {
    pub stop: Arc<Mutex<Option<String>>>,
    pub abort: Arc<Mutex<Option<AbortHandle>>>,
    pub done: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl JobControl {
    pub fn request_stop(&self, reason: &str) {
        if let Ok(mut s) = self.stop.lock() {
            s.get_or_insert_with(|| reason.to_string());
        }
        if let Ok(a) = self.abort.lock() {
            if let Some(h) = a.as_ref() {
                h.abort(reason);
            }
        }
        self.wake.notify_waiters();
    }

    /// The reason given to the first [`JobControl::request_stop`], if any.
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.lock().ok().and_then(|s| s.clone())
    }

    /// Makes `handle` the one an abort fires; fires it at once if the stop came first,
    /// so an abort that arrives while the handle is being set up is not lost.
    pub fn install_abort(&self, handle: AbortHandle) {
        if let Ok(mut slot) = self.abort.lock() {
            *slot = Some(handle.clone());
        }
        if let Some(reason) = self.stop_reason() {
            handle.abort(reason);
        }
    }

    /// Runs `fut` (a transfer through the coordinator) on `runtime`, giving up with
    /// `stopped: REASON` as soon as a stop is requested, instead of when it finishes.
    pub fn block_on_unless_stopped<F: std::future::Future>(
        &self,
        runtime: &tokio::runtime::Handle,
        fut: F,
    ) -> Result<F::Output, String> {
        runtime.block_on(async {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Registered before the check, so a stop between the two still wakes us.
            notified.as_mut().enable();
            if let Some(reason) = self.stop_reason() {
                return Err(format!("stopped: {reason}"));
            }
            tokio::select! {
                out = fut => Ok(out),
                _ = notified => Err(format!("stopped: {}", self.stop_reason().unwrap_or_default())),
            }
        })
    }
}
