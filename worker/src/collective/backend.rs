//! Choosing the gradient backend over the freshly formed ring (`--collective`).
//!
//! The ring is kept until every rank has confirmed that NCCL works for it, so that a
//! failure anywhere leaves every rank on a working ring instead of some ranks on a dead
//! NCCL communicator and the others waiting:
//!
//! 1. every rank says whether it can use NCCL at all (on CUDA, libnccl loadable);
//! 2. rank 0 creates the NCCL id and sends it with a flag saying whether that worked;
//! 3. every rank creates its communicator (bounded by the collective timeout) and says
//!    whether that worked.
//!
//! Each step is one all-reduce over the ring of a per-rank vector, so every rank reaches
//! the same verdict and knows which ranks failed. With `auto`, any failure means the ring
//! (and the reason, for the job log); with `nccl` it is an error. The ring's op timeout
//! becomes the collective timeout here, the one place every multi-rank job passes.

use super::nccl::{self, NcclComm, NcclOptions, UNIQUE_ID_BYTES};
use super::{AbortHandle, Collective, CollectiveError, Ring};
use std::time::Duration;

/// How a rank makes its NCCL communicator; a trait so the agreement is tested on CPU with
/// fakes (`worker/tests/backend.rs`).
pub trait NcclInit {
    type Comm: Collective + 'static;
    /// Why this rank cannot use NCCL at all, if it cannot.
    fn local_problem(&self) -> Option<String>;
    /// Rank 0 only: a fresh NCCL unique id.
    fn unique_id(&self) -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError>;
    /// Joins the communicator; must give up by itself within `timeout` and when `abort`
    /// fires.
    fn init(
        &self,
        rank: usize,
        world: usize,
        id: [u8; UNIQUE_ID_BYTES],
        timeout: Duration,
        abort: &AbortHandle,
    ) -> Result<Self::Comm, CollectiveError>;
}

/// The real thing: NCCL on this rank's CUDA device.
#[derive(Debug, Clone, Copy)]
pub struct SystemNccl {
    pub device: tch::Device,
}

impl NcclInit for SystemNccl {
    type Comm = NcclComm;
    fn local_problem(&self) -> Option<String> {
        if !self.device.is_cuda() {
            return Some(format!("trains on {:?}, not CUDA", self.device));
        }
        nccl::available().err().map(|e| e.to_string())
    }
    fn unique_id(&self) -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
        nccl::unique_id()
    }
    fn init(
        &self,
        rank: usize,
        world: usize,
        id: [u8; UNIQUE_ID_BYTES],
        timeout: Duration,
        abort: &AbortHandle,
    ) -> Result<NcclComm, CollectiveError> {
        let device = match self.device {
            tch::Device::Cuda(k) => k,
            other => return Err(CollectiveError::Config(format!("NCCL on {other:?}"))),
        };
        NcclComm::init(rank, world, id, &NcclOptions { device, timeout, abort: abort.clone() })
    }
}

/// What the ranks agreed on.
pub enum Chosen<C> {
    /// Gradients go over the ring; `why` says why not NCCL when `auto` fell back.
    Ring {
        ring: Box<Ring>,
        why: Option<String>,
    },
    Nccl(C),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `--collective nccl` but some rank cannot use NCCL at all: the same workers would
    /// vote the same way again, so this is a configuration error.
    #[error("--collective nccl requested but unusable on some rank: {0}")]
    Unusable(String),
    /// The ring itself failed while agreeing (a peer lost, an abort).
    #[error("agreeing on a backend: {0}")]
    Ring(#[source] CollectiveError),
    /// `--collective nccl` and creating the communicator failed on some rank.
    #[error("NCCL init: {0}")]
    Init(String),
}

/// Margin on the ring's op timeout while ranks wait for each other's NCCL creation, which
/// may itself take up to the collective timeout: a rank that gives up at its deadline
/// must still find the others listening.
const INIT_VOTE_MARGIN: Duration = Duration::from_secs(30);

/// Agrees on the backend for `wanted` ("auto", "ring" or "nccl") over `ring`; see the
/// module docs. `timeout` is the job's collective timeout.
pub fn choose<F: NcclInit>(
    mut ring: Ring,
    wanted: &str,
    timeout: Duration,
    nccl: &F,
) -> Result<Chosen<F::Comm>, BackendError> {
    ring.set_op_timeout(timeout).map_err(BackendError::Ring)?;
    if wanted == "ring" {
        return Ok(Chosen::Ring { ring: Box::new(ring), why: None });
    }
    let (rank, world) = (ring.rank(), ring.world_size());

    // 1. Can every rank use NCCL at all?
    let local = nccl.local_problem();
    let unable = vote(&mut ring, local.is_none())?;
    if !unable.is_empty() {
        let mut why = format!("NCCL unusable on rank(s) {}", list(&unable));
        if let Some(p) = &local {
            why.push_str(&format!(" (rank {rank}: {p})"));
        }
        return match wanted {
            "nccl" => Err(BackendError::Unusable(local.unwrap_or(why))),
            _ => Ok(Chosen::Ring { ring: Box::new(ring), why: Some(why) }),
        };
    }

    // 2. Rank 0's id, with a flag saying whether it could make one (if it could not, the
    //    others must not wait for an id that never comes).
    let mut msg = [0f32; 1 + UNIQUE_ID_BYTES];
    let mut id_error = None;
    if rank == 0 {
        match nccl.unique_id() {
            Ok(id) => {
                msg[0] = 1.0;
                for (dst, b) in msg[1..].iter_mut().zip(id) {
                    *dst = b as f32;
                }
            }
            Err(e) => id_error = Some(e.to_string()),
        }
    }
    ring.broadcast(&mut msg, 0).map_err(BackendError::Ring)?;
    if msg[0] != 1.0 {
        let why = format!("rank 0 could not create the NCCL id: {}", id_error.as_deref().unwrap_or("see its log"));
        return fallback(ring, wanted, why);
    }
    let id: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| msg[1 + i] as u8);

    // 3. Every rank creates its communicator, then all confirm over the ring.
    let abort = ring.abort_handle();
    let made = nccl.init(rank, world, id, timeout, &abort);
    // Peers may still be inside their creation for up to `timeout`.
    ring.set_op_timeout(timeout + INIT_VOTE_MARGIN).map_err(BackendError::Ring)?;
    let failed = vote(&mut ring, made.is_ok());
    ring.set_op_timeout(timeout).map_err(BackendError::Ring)?;
    let failed = failed?;
    match made {
        Ok(comm) if failed.is_empty() => Ok(Chosen::Nccl(comm)),
        // Dropping an unfinished communicator aborts it: never waits for the failed peers.
        made => {
            let mut why = format!("NCCL init failed on rank(s) {}", list(&failed));
            if let Err(e) = &made {
                why.push_str(&format!(" (rank {rank}: {e})"));
            }
            drop(made);
            fallback(ring, wanted, why)
        }
    }
}

fn fallback<C>(ring: Ring, wanted: &str, why: String) -> Result<Chosen<C>, BackendError> {
    match wanted {
        "nccl" => Err(BackendError::Init(why)),
        _ => Ok(Chosen::Ring { ring: Box::new(ring), why: Some(why) }),
    }
}

/// Every rank's yes/no, exchanged over the ring; returns the ranks that said no (the same
/// list on every rank). One f32 slot per rank: exact, whatever the summation order.
fn vote(ring: &mut Ring, ok: bool) -> Result<Vec<usize>, BackendError> {
    let (rank, world) = (ring.rank(), ring.world_size());
    let mut slots = vec![0f32; world];
    slots[rank] = if ok { 1.0 } else { 0.0 };
    ring.all_reduce_sum(&mut slots).map_err(BackendError::Ring)?;
    Ok(slots.iter().enumerate().filter(|(_, &v)| v != 1.0).map(|(r, _)| r).collect())
}

fn list(ranks: &[usize]) -> String {
    ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}
