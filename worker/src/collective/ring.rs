//! Ring all-reduce over direct TCP links: the [`Ring`] type, which ties together:
//!
//! * `link.rs`: dialling rank r+1, accepting rank r−1 and the authenticated
//!   handshake (message formats and MACs in `wire.rs`);
//! * `schedule.rs`: which segment each rank sends and receives at each step, and
//!   each rank's place in a broadcast;
//! * `executor/`: running an op on the calling thread (small ops) or pipelined
//!   over two threads (large ones);
//! * `io_error.rs`: turning socket errors into [`CollectiveError`]s.
//!
//! Rank r keeps two connections: it connects to (r+1)%N and sends on that link only, and
//! accepts from (r−1+N)%N and receives on that link only. All-reduce is reduce-scatter
//! followed by all-gather, each rank sending 2(N−1)/N·S bytes.
//!
//! Gradients may travel as 16-bit values ([`Ring::set_grad_compression`]): the gradient
//! all-reduce then uses its own op kind, so ranks that disagree on the format fail with a
//! protocol error; every other op stays f32 (see `compress.rs` and `executor/`).
//!
//! The ring also numbers the ops: every op starts with an [`OpHeader`] carrying the op's
//! kind, root, sequence number and length, so ranks that issue different ops fail with a
//! protocol error instead of summing misaligned bytes; and after any failure it refuses
//! further ops ([`CollectiveError::Broken`]), because the peers can no longer agree on
//! where in the byte stream they are.

use super::compress::Wire;
use super::executor::Executor;
use super::wire::{self, OpHeader};
use super::{check_broadcast_root, link, AbortHandle, Collective, CollectiveError, GradCompression};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tracing::warn;

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
    grad_compression: GradCompression,
    /// Whether the first fp16 overflow has been logged (once per ring: it repeats every
    /// step once it happens).
    warned_overflow: bool,
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
            Ok(exec) => Ok(Ring {
                rank,
                world: world_size,
                exec,
                seq: 0,
                abort,
                broken: None,
                abort_ids,
                grad_compression: GradCompression::None,
                warned_overflow: false,
            }),
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

    /// Bytes this rank has written to the link to the next rank since connecting: op
    /// headers and payload, not the handshake. An all-reduce of S values sends
    /// 2(N−1)/N·S values per rank, 4 bytes each in f32 and 2 compressed.
    pub fn bytes_sent(&self) -> u64 {
        self.exec.bytes_sent()
    }

    /// Finite gradient values that this rank's 16-bit roundings turned into ±inf since
    /// connecting (fp16 beyond ±65504; see `compress.rs`). Every rank receives the same
    /// ±inf, but only the rank whose rounding overflowed counts it.
    pub fn wire_overflows(&self) -> u64 {
        self.exec.overflows()
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
        check_broadcast_root(root, self.world)?;
        self.run(wire::op::BROADCAST, root, buf)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [1.0f32];
        self.run(wire::op::BARRIER, 0, &mut one)
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    fn set_grad_compression(&mut self, c: GradCompression) -> Result<(), CollectiveError> {
        self.grad_compression = c;
        Ok(())
    }

    fn grad_compression(&self) -> GradCompression {
        self.grad_compression
    }

    /// The all-reduce in the configured format: `None` is [`Ring::all_reduce_sum`] itself
    /// (op kind `ALL_REDUCE`, f32, unchanged); bf16/fp16 run the same schedule with
    /// 16-bit values on the links. A value that overflowed to ±inf is logged once.
    fn all_reduce_sum_grads(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let wire = Wire::of(self.grad_compression);
        if wire == Wire::F32 {
            return self.all_reduce_sum(buf);
        }
        let before = self.wire_overflows();
        self.run(wire::op::all_reduce(wire), 0, buf)?;
        let overflowed = self.wire_overflows() - before;
        if overflowed > 0 && !self.warned_overflow {
            self.warned_overflow = true;
            warn!(
                overflowed,
                compression = %self.grad_compression,
                "gradient sums beyond the 16-bit range (fp16: ±65504) became inf on the wire; \
                 with --precision fp16 the loss scaler skips such steps, otherwise the weights \
                 become non-finite and the job fails as diverged (use bf16 or none)"
            );
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Sender thread first: our registrations must outlive every use of the sockets.
        self.exec.stop();
        self.abort.unregister_streams(&self.abort_ids);
    }
}
