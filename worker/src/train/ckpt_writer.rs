//! Checkpoints off the training thread's critical path, so that no rank waits at the next
//! all-reduce while rank 0 writes (and uploads) one.
//!
//! The training thread only copies weights, buffers and momentum into host memory
//! ([`checkpoint::snapshot`]) and hands the copy over; a background thread writes it
//! (hashing while writing), commits the JSON record and runs the optional store function
//! (the coordinator upload). At most one checkpoint is in flight: handing over the next
//! one first waits for the previous, so memory holds at most two snapshots and the files
//! are committed in order. The outcome of each write comes back to the training thread
//! ([`Done`]), which reports it through the observer, so errors still surface there.

use super::checkpoint::{self, CheckpointError, CheckpointState, Snapshot};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// Stores a written checkpoint elsewhere (uploads it); runs on the writer thread after the
/// checkpoint is durably on disk. `Err` says why it is not stored.
pub type CheckpointStore = Box<dyn FnOnce(&Path, &CheckpointState) -> Result<(), String> + Send>;

/// The outcome of one background checkpoint.
pub struct Done {
    /// The checkpoint's name (`ckpt-eEEEE-sSSSSSS`).
    pub name: String,
    /// The JSON record's path and the completed record, or why it could not be written.
    pub written: Result<(PathBuf, CheckpointState), CheckpointError>,
    /// The store function's result; None when there was none or the write failed.
    pub stored: Option<Result<(), String>>,
}

/// The writer thread of the checkpoint in flight, if any.
#[derive(Default)]
pub struct BackgroundWriter {
    inflight: Option<(String, JoinHandle<Done>)>,
}

fn join(handle: JoinHandle<Done>, name: String) -> Done {
    handle.join().unwrap_or_else(|_| Done {
        name: name.clone(),
        written: Err(CheckpointError::Write {
            path: PathBuf::from(&name),
            source: std::io::Error::other("the checkpoint writer thread panicked"),
        }),
        stored: None,
    })
}

impl BackgroundWriter {
    /// Starts writing `snap` as `state` into `dir`, then `store` on it. Waits first for the
    /// checkpoint still in flight, if any, and returns its outcome.
    pub fn submit(
        &mut self,
        dir: &Path,
        state: CheckpointState,
        snap: Snapshot,
        store: Option<CheckpointStore>,
    ) -> Result<Option<Done>, CheckpointError> {
        let previous = self.wait();
        let dir = dir.to_path_buf();
        let name = state.name();
        let label = name.clone();
        let handle = std::thread::Builder::new()
            .name("cvdist-ckpt".into())
            .spawn(move || {
                let written = checkpoint::write_snapshot(&dir, state, &snap);
                drop(snap);
                let stored = match (&written, store) {
                    (Ok((json, state)), Some(store)) => Some(store(json, state)),
                    _ => None,
                };
                Done { name, written, stored }
            })
            .map_err(|source| CheckpointError::Write { path: PathBuf::from("checkpoint writer thread"), source })?;
        self.inflight = Some((label, handle));
        Ok(previous)
    }

    /// The outcome of the checkpoint in flight if it has finished; never blocks.
    pub fn poll(&mut self) -> Option<Done> {
        if self.inflight.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return self.wait();
        }
        None
    }

    /// Waits for the checkpoint in flight, if any, and returns its outcome.
    pub fn wait(&mut self) -> Option<Done> {
        let (name, handle) = self.inflight.take()?;
        Some(join(handle, name))
    }

    pub fn busy(&self) -> bool {
        self.inflight.is_some()
    }
}

impl Drop for BackgroundWriter {
    /// A training run that ends early (an error) still leaves no half-written checkpoint
    /// behind a running thread: the write completes (or fails) before the trainer returns.
    fn drop(&mut self) {
        let _ = self.wait();
    }
}
