//! The worker's current session with the coordinator as the training thread sees it: a
//! job outlives the session it was assigned on, so its checkpoint uploads take the key and
//! connection of whichever session holds the job now, and an upload cut off by a lost
//! session is retried on the next one instead of failing.

use super::control::JobControl;
use super::transfer::{self, TransferError};
use crate::train::checkpoint::CheckpointState;
use cvdist_common::client::Client;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// After an upload failed as if the connection were lost while the session still looks
/// up, how long to wait for the session loop to notice a loss (the client's HTTP/2
/// keep-alive gives up after 5 s + 10 s) before taking the failure as the coordinator's answer.
const LOSS_NOTICE: Duration = Duration::from_secs(30);

/// A session that holds the running job: its key (from `Registered`) and its connection.
#[derive(Clone)]
pub struct Attached {
    pub key: String,
    pub client: Client,
}

/// A checkpoint written while no session held the job: uploaded by the session loop once
/// one does (the newest replaces an older one; a later checkpoint supersedes it anyway).
#[derive(Clone, Debug)]
pub struct Deferred {
    pub job_id: String,
    pub attempt: u32,
    pub json: PathBuf,
    pub state: CheckpointState,
}

#[derive(Clone, Default)]
struct LinkState {
    /// Counts the sessions attached so far: an upload that failed on one is retried only
    /// on a later one.
    generation: u64,
    session: Option<Attached>,
    deferred: Option<Deferred>,
}

/// Shared between the session loop (which attaches and detaches sessions) and the job's
/// checkpoint writer (which uploads through the attached one).
#[derive(Clone)]
pub struct SessionLink {
    state: watch::Sender<LinkState>,
    /// How long a job trains without a session before the session loop stops it
    /// (`--detached-timeout`); an upload waits at most this long for a session.
    pub detached_timeout: Duration,
}

impl SessionLink {
    pub fn new(detached_timeout: Duration) -> SessionLink {
        SessionLink { state: watch::Sender::new(LinkState::default()), detached_timeout }
    }

    /// A session now holds the job (a fresh assignment, or the coordinator re-adopted it).
    pub fn attach(&self, session: Attached) {
        self.state.send_modify(|s| {
            s.generation += 1;
            s.session = Some(session);
        });
    }

    /// The session ended: uploads wait for the next one.
    pub fn detach(&self) {
        self.state.send_modify(|s| s.session = None);
    }

    /// The checkpoint waiting for a session, if any (see [`Deferred`]).
    pub fn take_deferred(&self) -> Option<Deferred> {
        let mut taken = None;
        self.state.send_if_modified(|s| {
            taken = s.deferred.take();
            false
        });
        taken
    }

    fn defer(&self, d: Deferred) {
        self.state.send_if_modified(|s| {
            s.deferred = Some(d);
            false
        });
    }

    fn current(&self) -> (u64, Option<Attached>) {
        let s = self.state.borrow();
        (s.generation, s.session.clone())
    }

    /// Waits until a session newer than `generation` is attached, at most until `deadline`.
    async fn next_session(&self, generation: u64, deadline: Instant) -> bool {
        let mut rx = self.state.subscribe();
        let newer = async move { rx.wait_for(|s| s.generation > generation && s.session.is_some()).await.is_ok() };
        matches!(tokio::time::timeout_at(deadline.into(), newer).await, Ok(true))
    }
}

/// Whether an upload failed because the connection to the coordinator did, rather than
/// because the coordinator refused it.
fn connection_lost(e: &TransferError) -> bool {
    matches!(
        e,
        TransferError::Rpc { code: tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled, .. }
    )
}

/// Uploads a checkpoint through the session that holds the job.
///
/// Without a session (or when the session is lost mid-upload), a checkpoint before the final
/// one is deferred: the session loop uploads it once a session holds the job again, and this
/// returns an error at once, so training does not wait for the coordinator (the local copy
/// stays until a later upload succeeds). The final checkpoint is waited for instead — the
/// job has nothing left to train, and the final model must reach the coordinator: it is
/// retried on the next session when this one is lost mid-upload or a newer session replaced
/// the one the upload began on (a restarted coordinator does not know the old session's
/// key). Gives up when the job is stopped (the session loop stops it after
/// `--detached-timeout` without a session), after that long without a session, or on a
/// refusal from the session that holds the job (disk full, bad checksum, ...).
#[allow(clippy::too_many_arguments)]
pub fn upload_checkpoint(
    link: &SessionLink,
    control: &JobControl,
    runtime: &tokio::runtime::Handle,
    job_id: &str,
    attempt: u32,
    json: &Path,
    state: &CheckpointState,
    is_final: bool,
) -> Result<(), String> {
    let name = state.name();
    let defer = || {
        link.defer(Deferred { job_id: job_id.to_string(), attempt, json: json.to_path_buf(), state: state.clone() });
        Err(format!("deferred: no session with the coordinator; {name} is uploaded when one is back"))
    };
    let mut deadline = Instant::now() + link.detached_timeout;
    let mut waited_for = None;
    loop {
        let (generation, session) = link.current();
        let Some(Attached { key, mut client }) = session else {
            if !is_final {
                return defer();
            }
            let since = *waited_for.get_or_insert_with(Instant::now);
            if !control.block_on_unless_stopped(runtime, link.next_session(generation, deadline))? {
                return Err(format!("no session with the coordinator for {:.0} s", since.elapsed().as_secs_f64()));
            }
            continue;
        };
        if let Some(since) = waited_for.take() {
            info!(checkpoint = %name, waited_s = since.elapsed().as_secs_f64(), "uploading after the session came back");
            deadline = Instant::now() + link.detached_timeout;
        }
        let upload = transfer::upload_checkpoint(&mut client, job_id, attempt, &key, json, state);
        let error = match control.block_on_unless_stopped(runtime, upload)? {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let (now_generation, now_session) = link.current();
        let replaced = now_generation != generation || now_session.is_none();
        if !(replaced || connection_lost(&error)) || Instant::now() >= deadline {
            return Err(error.to_string());
        }
        if !is_final {
            return defer();
        }
        warn!(checkpoint = %name, error = %error, "checkpoint upload cut off with the session; retrying on the next one");
        if !replaced {
            // The session may not have noticed the loss yet: wait for a newer one, but only
            // as long as the old one is still up after LOSS_NOTICE.
            waited_for = Some(Instant::now());
            let notice = (Instant::now() + LOSS_NOTICE).min(deadline);
            if !control.block_on_unless_stopped(runtime, link.next_session(generation, notice))? {
                let (g, session) = link.current();
                let still_up = g == generation && session.is_some();
                if still_up || !control.block_on_unless_stopped(runtime, link.next_session(generation, deadline))? {
                    return Err(error.to_string());
                }
            }
        }
    }
}
