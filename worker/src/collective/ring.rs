//! Ring all-reduce over direct TCP links: the [`Ring`] type, which ties together:
//!
//! * `link.rs`: dialling rank r+1, accepting rank r−1 and the authenticated
//!   handshake (message formats and MACs in `wire.rs`);
//! * `schedule.rs`: which segment each rank sends and receives at each step, and
//!   each rank's place in a broadcast;
//! * `executor.rs`: running an op on the calling thread (small ops) or pipelined
//!   over two threads (large ones);
//! * `io_error.rs`: turning socket errors into [`CollectiveError`]s.
//!
//! Rank r keeps two connections: it connects to (r+1)%N and sends on that link only, and
//! accepts from (r−1+N)%N and receives on that link only. All-reduce is reduce-scatter
//! followed by all-gather, each rank sending 2(N−1)/N·S bytes.
//!
//! The ring also numbers the ops: every op starts with an [`OpHeader`] carrying the op's
//! kind, root, sequence number and length, so ranks that issue different ops fail with a
//! protocol error instead of summing misaligned bytes; and after any failure it refuses
//! further ops ([`CollectiveError::Broken`]), because the peers can no longer agree on
//! where in the byte stream they are.

use super::executor::Executor;
use super::wire::{self, OpHeader};
use super::{link, AbortHandle, Collective, CollectiveError};
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Default pipelining chunk: large enough that syscall and wake-up overhead is noise,
/// small enough to stay in L2 while it is summed right after being received.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;

/// A connected ring of `world_size` ranks. See the module docs for the algorithm.
pub struct Ring {
    rank: usize,
    world: usize,
    exec: Executor,
    seq: u64,
    abort: AbortHandle,
    broken: Option<String>,
    /// Our sockets' registrations in `abort`, removed on drop.
    abort_ids: [u64; 2],
}

impl Ring {
    /// Connects rank `rank` into a ring of `world_size` ranks: connects to
    /// `peers[(rank+1)%N]` and accepts `(rank−1+N)%N` on `listener` (already bound to
    /// the address this rank advertised as `peers[rank]`), retrying until `timeout`.
    /// Both links are mutually authenticated with `secret`. `timeout` also becomes the op
    /// timeout: the longest an op waits for a peer without any progress.
    pub fn connect(
        rank: usize,
        world_size: usize,
        peers: &[String],
        listener: TcpListener,
        secret: &str,
        timeout: Duration,
    ) -> Result<Ring, CollectiveError> {
        Self::connect_with_abort(rank, world_size, peers, listener, secret, timeout, AbortHandle::new())
    }

    /// [`Ring::connect`] that can be interrupted by `abort` while connecting; the same
    /// handle then controls the connected ring.
    pub fn connect_with_abort(
        rank: usize,
        world_size: usize,
        peers: &[String],
        listener: TcpListener,
        secret: &str,
        timeout: Duration,
        abort: AbortHandle,
    ) -> Result<Ring, CollectiveError> {
        if world_size < 2 {
            return Err(CollectiveError::Config(format!(
                "a ring needs world size >= 2 (got {world_size}); use Solo for a single worker"
            )));
        }
        if rank >= world_size {
            return Err(CollectiveError::Config(format!("rank {rank} >= world size {world_size}")));
        }
        if peers.len() != world_size {
            return Err(CollectiveError::Config(format!(
                "{} data-plane addresses for world size {world_size}",
                peers.len()
            )));
        }
        if secret.is_empty() {
            return Err(CollectiveError::Config("empty data-plane secret".into()));
        }
        if u32::try_from(world_size).is_err() {
            return Err(CollectiveError::Config(format!("world size {world_size} too large")));
        }
        let next = (rank + 1) % world_size;
        let prev = (rank + world_size - 1) % world_size;
        let deadline = Instant::now() + timeout;
        let (send, recv) = link::establish(rank, world_size, &peers[next], listener, secret, deadline, &abort)?;

        let mut abort_ids = [0u64; 2];
        for (i, (s, peer)) in [(&send, next), (&recv, prev)].into_iter().enumerate() {
            s.set_nodelay(true).map_err(|e| CollectiveError::io(format!("TCP_NODELAY on link to rank {peer}"), e))?;
            abort_ids[i] = abort.register_stream(s)?;
        }
        let exec = Executor::start(rank, world_size, send, recv, DEFAULT_CHUNK_BYTES, timeout, abort.clone());
        match exec {
            Ok(exec) => Ok(Ring { rank, world: world_size, exec, seq: 0, abort, broken: None, abort_ids }),
            Err(e) => {
                abort.unregister_streams(&abort_ids);
                Err(e)
            }
        }
    }

    /// Pipelining granularity (rounded to whole floats, at least 1 KiB).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.exec.set_chunk_bytes(bytes);
    }

    /// How long an op may wait on a peer with no progress before failing with
    /// [`CollectiveError::Timeout`]. This bounds idle time per read/write, not the
    /// whole op, so it must exceed the worst skew between ranks entering an op.
    pub fn set_op_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        self.exec.set_op_timeout(timeout)
    }

    fn check_usable(&self) -> Result<(), CollectiveError> {
        self.abort.check()?;
        match &self.broken {
            Some(why) => Err(CollectiveError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    fn header(&mut self, kind: u32, root: usize, len: usize) -> OpHeader {
        self.seq += 1;
        OpHeader { kind, root: root as u32, seq: self.seq, elems: len as u64 }
    }

    /// Records a failure so that later ops fail fast, and closes the links so that the
    /// peers notice at once.
    fn poison(&mut self, e: CollectiveError) -> CollectiveError {
        let e = if self.abort.is_aborted() { self.abort.error() } else { e };
        self.broken = Some(e.to_string());
        self.exec.shutdown_links();
        e
    }

    fn run(&mut self, kind: u32, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.check_usable()?;
        let header = self.header(kind, root, buf.len());
        let r = self.exec.run(&header, root, buf);
        r.map_err(|e| self.poison(e))
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run(wire::op::ALL_REDUCE, 0, buf)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Config(format!("broadcast root {root} >= world size {}", self.world)));
        }
        self.run(wire::op::BROADCAST, root, buf)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [1.0f32];
        self.run(wire::op::BARRIER, 0, &mut one)
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Sender thread first: our registrations must outlive every use of the sockets.
        self.exec.stop();
        self.abort.unregister_streams(&self.abort_ids);
    }
}
