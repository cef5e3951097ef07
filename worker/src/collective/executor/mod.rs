//! Runs one op of the [ring schedule](super::schedule) over a rank's two links.
//!
//! Small ops (at most [`INLINE_MAX_BYTES`]) run entirely on the calling thread, sending
//! and then receiving each step. Larger ops are [pipelined](pipeline): a dedicated sender
//! thread writes while the calling thread reads and sums.
//!
//! A compressed gradient all-reduce (op kinds `ALL_REDUCE_BF16`/`_FP16`) runs the same
//! schedule with 16-bit values on the link (`compress.rs`, [`chunk_io`]): the sending side
//! rounds each chunk to 16-bit words just before writing it, the receiving side widens
//! what it reads to f32 and adds it to the buffer in f32, and when a chunk's sum is
//! complete (the last reduce-scatter step) the receiver rounds it in place before the
//! sender forwards it, so that every rank ends with the same rounded values. f32 ops put
//! the same bytes on the link and add in the same order as an uncompressed ring, so
//! compression costs f32 jobs nothing.

mod chunk_io;
mod pipeline;

use super::io_error::IoCtx;
use super::schedule::{AllReduce, Broadcast, Layout};
use super::wire::{self, OpHeader};
use super::{AbortHandle, CollectiveError};
use bytemuck::{cast_slice, cast_slice_mut};
use chunk_io::{recv_values, send_values, write_counted, Scratch};
use pipeline::Pipeline;
use std::net::TcpStream;
use std::time::Duration;

/// Ops at most this large run entirely on the calling thread, alternating send and
/// receive per step: that skips two thread hand-offs per hop, and a step's message is
/// far below any socket buffer so the writes cannot block on each other.
const INLINE_MAX_BYTES: usize = 16 * 1024;

/// The executing half of a [`super::Ring`]: its links, its sender thread and the scratch
/// memory for summing.
pub(super) struct Executor {
    rank: usize,
    world: usize,
    next: usize,
    prev: usize,
    /// Link from `prev`; only the calling thread reads it.
    recv: TcpStream,
    /// Clone of the link to `next`, written by the calling thread only for inline ops
    /// (while the sender thread is idle).
    send_inline: TcpStream,
    /// The calling thread's memory for receiving (and, inline, sending) one chunk.
    scratch: Scratch,
    op_timeout: Duration,
    abort: AbortHandle,
    pipeline: Pipeline,
}

impl Executor {
    /// Starts the sender thread of rank `rank` (of `world`) on the connected links.
    /// Chunking starts at `chunk_bytes` and the op timeout at `op_timeout`.
    pub fn start(
        rank: usize,
        world: usize,
        send: TcpStream,
        recv: TcpStream,
        chunk_bytes: usize,
        op_timeout: Duration,
        abort: AbortHandle,
    ) -> Result<Executor, CollectiveError> {
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let pipeline = Pipeline::start(rank, world, &send, &recv, &abort)?;
        let mut exec = Executor {
            rank,
            world,
            next,
            prev,
            recv,
            send_inline: send,
            scratch: Scratch::new(0),
            op_timeout,
            abort,
            pipeline,
        };
        exec.set_chunk_bytes(chunk_bytes);
        exec.set_op_timeout(op_timeout)?;
        Ok(exec)
    }

    /// Pipelining granularity (rounded to whole floats, at least 1 KiB).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        let chunk_elems = (bytes.max(1024)) / 4;
        self.pipeline.set_chunk_elems(chunk_elems);
        self.scratch = Scratch::new(chunk_elems);
    }

    /// Bytes written to the link to the next rank since the ring connected (op headers
    /// and payload).
    pub fn bytes_sent(&self) -> u64 {
        self.pipeline.stats().bytes_sent()
    }

    /// Finite values that this rank's 16-bit roundings turned into ±inf since the ring
    /// connected.
    pub fn overflows(&self) -> u64 {
        self.pipeline.stats().overflows()
    }

    /// See [`super::Ring::set_op_timeout`].
    pub fn set_op_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        if timeout.is_zero() {
            return Err(CollectiveError::Config("op timeout must be > 0".into()));
        }
        self.op_timeout = timeout;
        let t = Some(timeout);
        for (s, peer) in [(&self.send_inline, self.next), (&self.recv, self.prev)] {
            s.set_read_timeout(t)
                .and_then(|_| s.set_write_timeout(t))
                .map_err(|e| CollectiveError::io(format!("setting timeouts on link to rank {peer}"), e))?;
        }
        Ok(())
    }

    /// Shuts both links down, so that the neighbours notice a failure at once.
    pub fn shutdown_links(&self) {
        self.pipeline.shutdown_links();
    }

    /// Stops the sender thread and waits for it; the links are shut down first so that
    /// a blocked write returns. Idempotent.
    pub fn stop(&mut self) {
        self.pipeline.stop();
    }

    /// Runs the op that `header` describes (`root` for a broadcast) on `buf`, which all
    /// ranks pass with the same length.
    pub fn run(&mut self, header: &OpHeader, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if std::mem::size_of_val(buf) <= INLINE_MAX_BYTES {
            self.run_inline(header, root, buf)
        } else {
            self.run_pipelined(header, root, buf)
        }
    }

    /// Small ops: both directions from the calling thread, step by step.
    fn run_inline(&mut self, header: &OpHeader, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (kind, op) = (header.kind, wire::op::name(header.kind));
        let (n, r, prev) = (self.world, self.rank, self.prev);
        let tx = IoCtx { op, peer: self.next, timeout: self.op_timeout, abort: &self.abort };
        let rx = IoCtx { op, peer: prev, timeout: self.op_timeout, abort: &self.abort };
        let (send, recv, scratch) = (&mut self.send_inline, &mut self.recv, &mut self.scratch);
        let stats = self.pipeline.stats();
        let hdr = header.encode();
        let check_header = |recv: &mut TcpStream| -> Result<(), CollectiveError> {
            let bytes = rx.read_full_arr::<{ wire::OP_HEADER_LEN }>(recv)?;
            check_header_bytes(&bytes, header, op, prev, r)
        };
        if kind == wire::op::BROADCAST {
            let role = Broadcast::new(r, root, n);
            if role.is_root() {
                write_counted(&tx, send, &hdr, cast_slice(buf), stats)?;
                // The last rank's header closes the loop and confirms it agreed on the op.
                return check_header(recv);
            }
            // Header first, so the next rank can validate while we wait for data.
            write_counted(&tx, send, &hdr, &[], stats)?;
            check_header(recv)?;
            rx.read_full(recv, cast_slice_mut(buf))?;
            if role.forwards() {
                write_counted(&tx, send, &[], cast_slice(buf), stats)?;
            }
            return Ok(());
        }
        // One item per step: no chunking, the calling thread does both directions (one at
        // a time, so the send may borrow the receive scratch's words).
        let wire = wire::op::wire(kind);
        let (sched, lay) = (AllReduce::new(r, n), Layout::new(n, buf.len(), usize::MAX));
        for (out, inc) in sched.send_items(lay).zip(sched.recv_items(lay)) {
            let first = if out.step == 0 { &hdr[..] } else { &[] };
            let src = &buf[out.start..out.start + out.len];
            send_values(&tx, send, first, src, wire, &mut scratch.words, stats)?;
            if out.step == 0 {
                check_header(recv)?;
            }
            let dst = &mut buf[inc.start..inc.start + inc.len];
            recv_values(&rx, recv, dst, inc.reduces, inc.completes, wire, scratch, stats)?;
        }
        if kind == wire::op::BARRIER && buf.first().is_some_and(|&v| v != n as f32) {
            return Err(CollectiveError::Protocol(format!("barrier counted {:?} ranks, expected {n}", buf.first())));
        }
        Ok(())
    }

    /// Large ops: the sender thread writes while this thread reads and sums.
    fn run_pipelined(&mut self, header: &OpHeader, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let rx =
            IoCtx { op: wire::op::name(header.kind), peer: self.prev, timeout: self.op_timeout, abort: &self.abort };
        self.pipeline.run(&mut self.recv, &mut self.scratch, rx, header, root, buf)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Checks the op header the previous rank sent against the op this rank is in.
fn check_header_bytes(
    bytes: &[u8; wire::OP_HEADER_LEN],
    ours: &OpHeader,
    op: &str,
    prev: usize,
    rank: usize,
) -> Result<(), CollectiveError> {
    let theirs = OpHeader::decode(bytes)
        .ok_or_else(|| CollectiveError::Protocol(format!("rank {prev} sent a corrupt op header during {op}")))?;
    if theirs != *ours {
        return Err(CollectiveError::Protocol(format!(
            "ranks disagree on op #{}: rank {prev} is in {} #{} of {} floats (root {}), rank {rank} in {} #{} of {} floats (root {})",
            ours.seq,
            wire::op::name(theirs.kind),
            theirs.seq,
            theirs.elems,
            theirs.root,
            wire::op::name(ours.kind),
            ours.seq,
            ours.elems,
            ours.root
        )));
    }
    Ok(())
}
