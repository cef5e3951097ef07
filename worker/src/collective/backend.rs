//! Choosing the gradient backend over the freshly formed ring (`--collective`).
//!
//! `ring` keeps the TCP ring. `gloo` and `nccl` move every collective onto a c10d process
//! group ([`super::c10d`]); `auto` means NCCL on CUDA and the ring on CPU. The ring is kept
//! until every rank has confirmed that its group works, so that a failure anywhere leaves
//! every rank on a working ring instead of some ranks in a dead group and the others
//! waiting:
//!
//! 1. every rank says whether it can use the backend at all (NCCL: trains on CUDA and this
//!    build has NCCL);
//! 2. rank 0 starts the attempt's rendezvous store ([`super::rendezvous`], authenticated
//!    with the attempt's secret) and sends its port with a flag saying whether that worked;
//! 3. every rank joins the group (bounded by the collective timeout) and says whether that
//!    worked.
//!
//! Each step is one all-reduce over the ring of a per-rank vector, so every rank reaches
//! the same verdict and knows which ranks failed. With `auto`, any failure means the ring
//! (and the reason, for the job log); with `gloo` or `nccl` it is an error. The ring's op
//! timeout becomes the collective timeout here, the one place every multi-rank job passes.

use super::c10d::{self, GroupBackend, ProcessGroup, Rendezvous};
use super::rendezvous::StoreServer;
use super::{AbortHandle, Collective, CollectiveError, Ring};
use std::time::Duration;

/// How a rank joins its c10d group; a trait so the agreement is tested on CPU with fakes
/// (`worker/tests/backend.rs`) as well as with real gloo groups.
pub trait GroupInit {
    type Comm: Collective + 'static;
    /// The backend to make.
    fn backend(&self) -> GroupBackend;
    /// Why this rank cannot use the backend at all, if it cannot.
    fn local_problem(&self) -> Option<String>;
    /// Joins the group; must give up by itself within `timeout` and when `abort` fires.
    /// `server` is rank 0's store, for the group to keep alive.
    #[allow(clippy::too_many_arguments)]
    fn init(
        &self,
        rank: usize,
        world: usize,
        rendezvous: &Rendezvous,
        timeout: Duration,
        abort: &AbortHandle,
        server: Option<StoreServer>,
    ) -> Result<Self::Comm, CollectiveError>;
}

/// The real thing: a c10d process group on this rank's device.
#[derive(Debug, Clone, Copy)]
pub struct SystemGroup {
    pub backend: GroupBackend,
}

impl SystemGroup {
    /// The group `wanted` ("gloo", "nccl" or "auto") means on `device`; `None` for the
    /// ring (`ring`, or `auto` on a CPU).
    pub fn for_choice(wanted: &str, device: tch::Device) -> Option<SystemGroup> {
        let nccl = |device: tch::Device| match device {
            tch::Device::Cuda(k) => GroupBackend::Nccl { device: k },
            // Refused by `local_problem` with the reason.
            _ => GroupBackend::Nccl { device: usize::MAX },
        };
        match (wanted, device) {
            ("gloo", _) => Some(SystemGroup { backend: GroupBackend::Gloo }),
            ("nccl", d) => Some(SystemGroup { backend: nccl(d) }),
            ("auto", d @ tch::Device::Cuda(_)) => Some(SystemGroup { backend: nccl(d) }),
            _ => None,
        }
    }
}

impl GroupInit for SystemGroup {
    type Comm = ProcessGroup;
    fn backend(&self) -> GroupBackend {
        self.backend
    }
    fn local_problem(&self) -> Option<String> {
        match self.backend {
            GroupBackend::Gloo => None,
            GroupBackend::Nccl { device: usize::MAX } => {
                Some("NCCL needs a CUDA device; this rank trains on the CPU".into())
            }
            GroupBackend::Nccl { .. } if !c10d::nccl_built() => {
                Some("this cvdist was built against a libtorch without CUDA/NCCL".into())
            }
            GroupBackend::Nccl { .. } => None,
        }
    }
    fn init(
        &self,
        rank: usize,
        world: usize,
        rendezvous: &Rendezvous,
        timeout: Duration,
        abort: &AbortHandle,
        server: Option<StoreServer>,
    ) -> Result<ProcessGroup, CollectiveError> {
        ProcessGroup::new(self.backend, rank, world, rendezvous, timeout, abort.clone(), server)
    }
}

/// What the ranks agreed on.
pub enum Chosen<C> {
    /// Gradients go over the ring; `why` says why not a c10d group when `auto` fell back.
    Ring {
        ring: Box<Ring>,
        why: Option<String>,
    },
    Group(C),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `--collective gloo|nccl` but some rank cannot use it at all: the same workers would
    /// vote the same way again, so this is a configuration error.
    #[error("--collective {wanted} requested but unusable on some rank: {why}")]
    Unusable { wanted: String, why: String },
    /// The ring itself failed while agreeing (a peer lost, an abort).
    #[error("agreeing on a backend: {0}")]
    Ring(#[source] CollectiveError),
    /// `--collective gloo|nccl` and joining the group failed on some rank.
    #[error("process group init: {0}")]
    Init(String),
}

/// Margin on the ring's op timeout while ranks wait for each other's group creation, which
/// may itself take up to the collective timeout: a rank that gives up at its deadline
/// must still find the others listening.
const INIT_VOTE_MARGIN: Duration = Duration::from_secs(30);

/// Where this rank is: its rank's and rank 0's data-plane addresses and the attempt's
/// secret, from which the rendezvous is derived.
#[derive(Debug, Clone)]
pub struct Addresses<'a> {
    pub peers: &'a [String],
    pub secret: &'a str,
}

/// Agrees on the backend for `wanted` ("auto", "ring", "gloo" or "nccl") over `ring`; see
/// the module docs. `timeout` is the job's collective timeout. `group` is `None` when
/// `wanted` means the ring on this device.
pub fn choose<F: GroupInit>(
    mut ring: Ring,
    wanted: &str,
    timeout: Duration,
    addrs: &Addresses<'_>,
    group: Option<&F>,
) -> Result<Chosen<F::Comm>, BackendError> {
    ring.set_op_timeout(timeout).map_err(BackendError::Ring)?;
    let Some(group) = group else {
        return Ok(Chosen::Ring { ring: Box::new(ring), why: None });
    };
    let (rank, world) = (ring.rank(), ring.world_size());
    let backend = group.backend();

    // 1. Can every rank use the backend at all?
    let local = group.local_problem();
    let unable = vote(&mut ring, local.is_none())?;
    if !unable.is_empty() {
        let mut why = format!("{backend} unusable on rank(s) {}", list(&unable));
        if let Some(p) = &local {
            why.push_str(&format!(" (rank {rank}: {p})"));
        }
        return match wanted {
            "auto" => Ok(Chosen::Ring { ring: Box::new(ring), why: Some(why) }),
            _ => Err(BackendError::Unusable { wanted: wanted.into(), why: local.unwrap_or(why) }),
        };
    }

    // 2. Rank 0's store, and its port with a flag saying whether it started (if it did
    //    not, the others must not wait for a store that never comes).
    let mut msg = [0f32; 2];
    let mut server = None;
    let mut store_error = None;
    if rank == 0 {
        match StoreServer::start(c10d::bind_ip(&addrs.peers[0]), addrs.secret.as_bytes()) {
            Ok(s) => {
                msg = [1.0, f32::from(s.port())];
                server = Some(s);
            }
            Err(e) => store_error = Some(e.to_string()),
        }
    }
    ring.broadcast(&mut msg, 0).map_err(BackendError::Ring)?;
    if msg[0] != 1.0 {
        let why =
            format!("rank 0 could not start the rendezvous store: {}", store_error.as_deref().unwrap_or("see its log"));
        return fallback(ring, wanted, why);
    }
    let rendezvous = Rendezvous {
        store_addr: format!("{}:{}", bracket(&c10d::host_of(&addrs.peers[0])), msg[1] as u16),
        secret: addrs.secret.as_bytes().to_vec(),
        host: c10d::host_of(&addrs.peers[rank]),
    };

    // 3. Every rank joins the group, then all confirm over the ring.
    let abort = ring.abort_handle();
    let made = group.init(rank, world, &rendezvous, timeout, &abort, server);
    // Peers may still be inside their creation for up to `timeout`.
    ring.set_op_timeout(timeout + INIT_VOTE_MARGIN).map_err(BackendError::Ring)?;
    let failed = vote(&mut ring, made.is_ok());
    ring.set_op_timeout(timeout).map_err(BackendError::Ring)?;
    let failed = failed?;
    match made {
        Ok(comm) if failed.is_empty() => Ok(Chosen::Group(comm)),
        made => {
            let mut why = format!("{backend} group init failed on rank(s) {}", list(&failed));
            if let Err(e) = &made {
                why.push_str(&format!(" (rank {rank}: {e})"));
            }
            drop(made);
            fallback(ring, wanted, why)
        }
    }
}

/// An IPv6 literal in brackets, as `host:port` needs it.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn fallback<C>(ring: Ring, wanted: &str, why: String) -> Result<Chosen<C>, BackendError> {
    match wanted {
        "auto" => Ok(Chosen::Ring { ring: Box::new(ring), why: Some(why) }),
        _ => Err(BackendError::Init(why)),
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
