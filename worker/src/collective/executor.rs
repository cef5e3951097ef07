//! Runs one op of the [ring schedule](super::schedule) over a rank's two links.
//!
//! Small ops (at most [`INLINE_MAX_BYTES`]) run entirely on the calling thread, sending
//! and then receiving each step. Larger ops are pipelined: a dedicated sender thread
//! writes while the calling thread reads and sums. Every segment is cut into the same
//! number of chunks C, so "step s, chunk c" has the linear index s·C+c on both sides and
//! the only cross-thread dependency is a pair of counters:
//! * the sender may send chunk (s, c) once the receiver finished (s−1, c), because in a
//!   ring the segment sent at step s is exactly the one received at step s−1;
//! * the receiver may overwrite (s, c) only once the sender finished reading the same
//!   memory, which (segments rotate mod N) was chunk (s+1−N, c). A well-behaved peer
//!   can't cause a wait there, but the check keeps a misbehaving one from racing us.
//!
//! Only the chunk *timing* depends on C; the byte stream on a link is the same for any
//! chunking, so ranks may even use different chunk sizes.
//!
//! A compressed gradient all-reduce (op kinds `ALL_REDUCE_BF16`/`_FP16`) runs the same
//! schedule with 16-bit values on the link (`compress.rs`): the sending side rounds each
//! chunk to 16-bit words just before writing it, the receiving side widens what it reads
//! to f32 and adds it to the buffer in f32, and when a chunk's sum is complete (the last
//! reduce-scatter step) the receiver rounds it in place before the sender forwards it,
//! so that every rank ends with the same rounded values. f32 ops put the same bytes on
//! the link and add in the same order as an uncompressed ring, so compression costs f32
//! jobs nothing.

use super::compress::Wire;
use super::io_error::{failure_or_abort, IoCtx};
use super::schedule::{AllReduce, Broadcast, Item, Layout};
use super::wire::{self, OpHeader};
use super::{AbortHandle, CollectiveError};
use bytemuck::{cast_slice, cast_slice_mut};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

/// Ops at most this large run entirely on the calling thread, alternating send and
/// receive per step: that skips two thread hand-offs per hop, and a step's message is
/// far below any socket buffer so the writes cannot block on each other.
const INLINE_MAX_BYTES: usize = 16 * 1024;

/// How long a waiting thread sleeps before re-checking abort/failure flags on its own.
const PARK_SLICE: Duration = Duration::from_millis(20);

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
    chunk_elems: usize,
    op_timeout: Duration,
    abort: AbortHandle,
    shared: Arc<Shared>,
    jobs: Option<SyncSender<Job>>,
    replies: Receiver<Result<(), CollectiveError>>,
    sender: Option<JoinHandle<()>>,
    sender_thread: Thread,
}

/// State shared between the calling thread and the sender thread for one op.
struct Shared {
    /// Receive items completed in the current op (linear chunk index).
    recv_done: AtomicUsize,
    /// Send items completed in the current op.
    sent_done: AtomicUsize,
    failed: AtomicBool,
    /// Which side failed first: 0 none, 1 receiver, 2 sender.
    first_failure: AtomicU8,
    /// Both links, for shutting down on failure without marking the ring aborted.
    links: [TcpStream; 2],
    /// Bytes written to the link to `next` since the ring connected (op headers and
    /// payload; the handshake before is not counted).
    bytes_sent: AtomicU64,
    /// Finite values that a 16-bit rounding on this rank turned into ±inf.
    overflows: AtomicU64,
}

/// One chunk's worth of working memory: f32 values to sum, and the 16-bit words a
/// compressed op reads or writes. Both hold `chunk_elems` values.
struct Scratch {
    values: Vec<f32>,
    words: Vec<u16>,
}

impl Scratch {
    fn new(elems: usize) -> Scratch {
        Scratch { values: vec![0.0; elems], words: vec![0; elems] }
    }
}

const SIDE_RECV: u8 = 1;
const SIDE_SEND: u8 = 2;

impl Shared {
    fn fail(&self, side: u8) {
        let _ = self.first_failure.compare_exchange(0, side, Ordering::SeqCst, Ordering::SeqCst);
        self.failed.store(true, Ordering::SeqCst);
        // The ring cannot recover mid-op (the peers would disagree on stream offsets), so
        // closing both links turns our failure into prompt errors on the neighbours
        // instead of them waiting out their timeouts.
        self.shutdown_links();
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn shutdown_links(&self) {
        for l in &self.links {
            let _ = l.shutdown(Shutdown::Both);
        }
    }

    fn overflowed(&self, n: usize) {
        if n > 0 {
            self.overflows.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy)]
enum JobKind {
    AllReduce,
    Broadcast { root: usize },
}

/// Raw view of the caller's buffer handed to the sender thread. The caller blocks until
/// the sender replies (see [`ReplyGuard`]), so the memory outlives every access.
#[derive(Clone, Copy)]
struct BufPtr(*mut f32);
// SAFETY: the pointer is only dereferenced for ranges that the protocol's counters keep
// disjoint from what the other thread touches at the same time.
unsafe impl Send for BufPtr {}

struct Job {
    kind: JobKind,
    /// The format of the values on the link (f32 for everything but a compressed
    /// gradient all-reduce).
    wire: Wire,
    /// The op's name, for errors.
    op: &'static str,
    buf: BufPtr,
    len: usize,
    header: [u8; wire::OP_HEADER_LEN],
    /// Must equal the receiver's, since the two threads' counters index the same chunks.
    chunk_elems: usize,
    caller: Thread,
}

/// `dst += src`, element by element (a loop the compiler vectorises).
#[inline]
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Writes `first` then `second` and counts the bytes as sent.
fn write_counted(
    tx: &IoCtx<'_>,
    stream: &mut TcpStream,
    first: &[u8],
    second: &[u8],
    shared: &Shared,
) -> Result<(), CollectiveError> {
    tx.write_full(stream, first, second)?;
    shared.bytes_sent.fetch_add((first.len() + second.len()) as u64, Ordering::Relaxed);
    Ok(())
}

/// Sends `first` (an op header, or nothing) followed by the values `src` in `wire`'s
/// format. f32 goes out as it is; 16-bit formats are rounded into `words` piece by piece
/// (the first piece carries `first`), counting overflows. `words` must not be empty.
fn send_values(
    tx: &IoCtx<'_>,
    stream: &mut TcpStream,
    first: &[u8],
    src: &[f32],
    wire: Wire,
    words: &mut [u16],
    shared: &Shared,
) -> Result<(), CollectiveError> {
    if wire == Wire::F32 {
        return write_counted(tx, stream, first, cast_slice(src), shared);
    }
    let mut first = first;
    for piece in src.chunks(words.len()) {
        let w = &mut words[..piece.len()];
        shared.overflowed(wire.encode(piece, w));
        write_counted(tx, stream, first, cast_slice(w), shared)?;
        first = &[];
    }
    if !first.is_empty() {
        write_counted(tx, stream, first, &[], shared)?;
    }
    Ok(())
}

/// Receives the values for `dst` in `wire`'s format: added to `dst` when `reduces`,
/// written over it otherwise. When `completes` (the sum of `dst` is final after this
/// add) a 16-bit op rounds `dst` to what it will forward, so the owner holds the same
/// value as every rank it sends it to. `scratch` may be smaller than `dst`.
#[allow(clippy::too_many_arguments)]
fn recv_values(
    rx: &IoCtx<'_>,
    stream: &mut TcpStream,
    dst: &mut [f32],
    reduces: bool,
    completes: bool,
    wire: Wire,
    scratch: &mut Scratch,
    shared: &Shared,
) -> Result<(), CollectiveError> {
    if wire == Wire::F32 {
        if !reduces {
            return rx.read_full(stream, cast_slice_mut(dst));
        }
        // A segment can exceed the scratch when chunk_bytes was set very small.
        for piece in dst.chunks_mut(scratch.values.len()) {
            let tmp = &mut scratch.values[..piece.len()];
            rx.read_full(stream, cast_slice_mut(tmp))?;
            add_into(piece, tmp);
        }
        return Ok(());
    }
    for piece in dst.chunks_mut(scratch.words.len()) {
        let w = &mut scratch.words[..piece.len()];
        rx.read_full(stream, cast_slice_mut(w))?;
        if !reduces {
            wire.decode(w, piece);
            continue;
        }
        let tmp = &mut scratch.values[..piece.len()];
        wire.decode_add(w, piece, tmp);
        if completes {
            shared.overflowed(wire.round(piece, w));
        }
    }
    Ok(())
}

/// Parks until `counter >= target`, or fails once the op failed or was aborted.
fn wait_for(counter: &AtomicUsize, target: usize, shared: &Shared, abort: &AbortHandle) -> bool {
    let mut spins = 0u32;
    loop {
        if counter.load(Ordering::Acquire) >= target {
            return true;
        }
        if shared.failed() || abort.is_aborted() {
            return false;
        }
        // A short spin catches the common case where the other thread is about to
        // finish the chunk; parking costs a futex round trip.
        if spins < 64 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            thread::park_timeout(PARK_SLICE);
        }
    }
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
        let clone = |s: &TcpStream| s.try_clone().map_err(|e| CollectiveError::io("cloning ring socket", e));
        let shared = Arc::new(Shared {
            recv_done: AtomicUsize::new(0),
            sent_done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            first_failure: AtomicU8::new(0),
            links: [clone(&send)?, clone(&recv)?],
            bytes_sent: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        });
        let (job_tx, job_rx) = sync_channel::<Job>(1);
        let (reply_tx, reply_rx) = sync_channel(1);
        let sender = {
            let (shared, abort, stream) = (shared.clone(), abort.clone(), clone(&send)?);
            thread::Builder::new()
                .name(format!("ring-send-{rank}"))
                .spawn(move || sender_loop(stream, next, world, rank, job_rx, reply_tx, shared, abort))
                .map_err(|e| CollectiveError::io("spawning ring sender thread", e))?
        };
        let sender_thread = sender.thread().clone();
        abort.register_thread(sender_thread.clone());
        let mut exec = Executor {
            rank,
            world,
            next,
            prev,
            recv,
            send_inline: send,
            scratch: Scratch::new(0),
            chunk_elems: 0,
            op_timeout,
            abort,
            shared,
            jobs: Some(job_tx),
            replies: reply_rx,
            sender: Some(sender),
            sender_thread,
        };
        exec.set_chunk_bytes(chunk_bytes);
        exec.set_op_timeout(op_timeout)?;
        Ok(exec)
    }

    /// Pipelining granularity (rounded to whole floats, at least 1 KiB).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_elems = (bytes.max(1024)) / 4;
        self.scratch = Scratch::new(self.chunk_elems);
    }

    /// Bytes written to the link to the next rank since the ring connected (op headers
    /// and payload).
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::Relaxed)
    }

    /// Finite values that this rank's 16-bit roundings turned into ±inf since the ring
    /// connected.
    pub fn overflows(&self) -> u64 {
        self.shared.overflows.load(Ordering::Relaxed)
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
        self.shared.shutdown_links();
    }

    /// Stops the sender thread and waits for it; the links are shut down first so that
    /// a blocked write returns. Idempotent.
    pub fn stop(&mut self) {
        self.shutdown_links();
        // Closing the job channel ends the sender loop.
        self.jobs = None;
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
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
        let shared = &*self.shared;
        let hdr = header.encode();
        let check_header = |recv: &mut TcpStream| -> Result<(), CollectiveError> {
            let bytes = rx.read_full_arr::<{ wire::OP_HEADER_LEN }>(recv)?;
            check_header_bytes(&bytes, header, op, prev, r)
        };
        if kind == wire::op::BROADCAST {
            let role = Broadcast::new(r, root, n);
            if role.is_root() {
                write_counted(&tx, send, &hdr, cast_slice(buf), shared)?;
                // The last rank's header closes the loop and confirms it agreed on the op.
                return check_header(recv);
            }
            // Header first, so the next rank can validate while we wait for data.
            write_counted(&tx, send, &hdr, &[], shared)?;
            check_header(recv)?;
            rx.read_full(recv, cast_slice_mut(buf))?;
            if role.forwards() {
                write_counted(&tx, send, &[], cast_slice(buf), shared)?;
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
            send_values(&tx, send, first, src, wire, &mut scratch.words, shared)?;
            if out.step == 0 {
                check_header(recv)?;
            }
            let dst = &mut buf[inc.start..inc.start + inc.len];
            recv_values(&rx, recv, dst, inc.reduces, inc.completes, wire, scratch, shared)?;
        }
        if kind == wire::op::BARRIER && buf.first().is_some_and(|&v| v != n as f32) {
            return Err(CollectiveError::Protocol(format!("barrier counted {:?} ranks, expected {n}", buf.first())));
        }
        Ok(())
    }

    /// Large ops: the sender thread writes while this thread reads and sums.
    fn run_pipelined(&mut self, header: &OpHeader, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (kind, op) = (header.kind, wire::op::name(header.kind));
        let job_kind = if kind == wire::op::BROADCAST { JobKind::Broadcast { root } } else { JobKind::AllReduce };
        self.shared.recv_done.store(0, Ordering::SeqCst);
        self.shared.sent_done.store(0, Ordering::SeqCst);
        self.shared.failed.store(false, Ordering::SeqCst);
        self.shared.first_failure.store(0, Ordering::SeqCst);
        let job = Job {
            kind: job_kind,
            wire: wire::op::wire(kind),
            op,
            buf: BufPtr(buf.as_mut_ptr()),
            len: buf.len(),
            header: header.encode(),
            chunk_elems: self.chunk_elems,
            caller: thread::current(),
        };
        let jobs = self.jobs.as_ref().ok_or_else(|| CollectiveError::Broken("sender thread stopped".into()))?;
        jobs.send(job).map_err(|_| CollectiveError::Broken("ring sender thread exited".into()))?;
        // From here the sender thread may touch `buf`; the guard makes sure we don't
        // return (or unwind) before it has replied.
        let mut guard = ReplyGuard { replies: &self.replies, shared: &self.shared, done: false };
        let ptr = BufPtr(buf.as_mut_ptr());
        let len = buf.len();
        let recv_res = receive(
            &mut self.recv,
            &mut self.scratch,
            self.chunk_elems,
            &self.shared,
            IoCtx { op, peer: self.prev, timeout: self.op_timeout, abort: &self.abort },
            job_kind,
            ptr,
            len,
            self.rank,
            self.world,
            header,
            &self.sender_thread,
        );
        if recv_res.is_err() {
            self.shared.fail(SIDE_RECV);
        }
        let send_res = guard.wait();
        match (recv_res, send_res) {
            (Ok(()), Ok(())) => {}
            (Err(e), Ok(())) | (Ok(()), Err(e)) => return Err(e),
            (Err(re), Err(se)) => {
                return Err(if self.shared.first_failure.load(Ordering::SeqCst) == SIDE_SEND { se } else { re });
            }
        }
        if kind == wire::op::BARRIER && buf.first().is_some_and(|&v| v != self.world as f32) {
            return Err(CollectiveError::Protocol("barrier sum mismatch".into()));
        }
        Ok(())
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.stop();
    }
}

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

/// Waits for the sender thread's reply even on early return or unwinding, because the
/// sender may still be reading the caller's buffer.
struct ReplyGuard<'a> {
    replies: &'a Receiver<Result<(), CollectiveError>>,
    shared: &'a Shared,
    done: bool,
}

impl ReplyGuard<'_> {
    fn wait(&mut self) -> Result<(), CollectiveError> {
        self.done = true;
        self.replies.recv().unwrap_or_else(|_| Err(CollectiveError::Broken("ring sender thread exited mid-op".into())))
    }
}

impl Drop for ReplyGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.fail(SIDE_RECV);
            let _ = self.replies.recv();
        }
    }
}

/// The receiving half of a pipelined op, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn receive(
    stream: &mut TcpStream,
    scratch: &mut Scratch,
    chunk_elems: usize,
    shared: &Shared,
    rx: IoCtx<'_>,
    kind: JobKind,
    buf: BufPtr,
    len: usize,
    rank: usize,
    n: usize,
    header: &OpHeader,
    sender: &Thread,
) -> Result<(), CollectiveError> {
    let bytes = rx.read_full_arr::<{ wire::OP_HEADER_LEN }>(stream)?;
    check_header_bytes(&bytes, header, rx.op, rx.peer, rank)?;
    let io = PipeIo { shared, buf, other: sender, wire: wire::op::wire(header.kind) };
    match kind {
        JobKind::Broadcast { root } => {
            let items = Broadcast::new(rank, root, n).recv_items(Broadcast::layout(len, chunk_elems));
            receive_items(items, stream, scratch, &rx, &io)
        }
        JobKind::AllReduce => {
            let items = AllReduce::new(rank, n).recv_items(Layout::new(n, len, chunk_elems));
            receive_items(items, stream, scratch, &rx, &io)
        }
    }
}

/// What both halves of a pipelined op share: the progress counters, the caller's
/// buffer, the thread to wake after each item and the values' format on the link.
struct PipeIo<'a> {
    shared: &'a Shared,
    buf: BufPtr,
    other: &'a Thread,
    wire: Wire,
}

fn receive_items(
    items: impl Iterator<Item = Item>,
    stream: &mut TcpStream,
    scratch: &mut Scratch,
    rx: &IoCtx<'_>,
    io: &PipeIo<'_>,
) -> Result<(), CollectiveError> {
    let shared = io.shared;
    for it in items {
        if let Some(target) = it.after_other {
            if !wait_for(&shared.sent_done, target, shared, rx.abort) {
                return Err(failure_or_abort(rx.abort));
            }
        }
        // SAFETY: the counters keep this range disjoint from what the sender thread is
        // reading (`after_other`); `buf` outlives the op (ReplyGuard).
        let dst = unsafe { std::slice::from_raw_parts_mut(io.buf.0.add(it.start), it.len) };
        recv_values(rx, stream, dst, it.reduces, it.completes, io.wire, scratch, shared)?;
        shared.recv_done.store(it.done, Ordering::Release);
        io.other.unpark();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn sender_loop(
    mut stream: TcpStream,
    next: usize,
    n: usize,
    rank: usize,
    jobs: Receiver<Job>,
    replies: SyncSender<Result<(), CollectiveError>>,
    shared: Arc<Shared>,
    abort: AbortHandle,
) {
    // Where a compressed op's chunks are rounded to 16 bits before they are written; grown
    // to the job's chunk size on first use.
    let mut words: Vec<u16> = Vec::new();
    while let Ok(job) = jobs.recv() {
        let timeout = stream.write_timeout().ok().flatten().unwrap_or(Duration::from_secs(0));
        let tx = IoCtx { op: job.op, peer: next, timeout, abort: &abort };
        if words.len() < job.chunk_elems.max(1) {
            words.resize(job.chunk_elems.max(1), 0);
        }
        let r = send_job(&mut stream, &job, &shared, tx, rank, n, &mut words);
        if r.is_err() {
            shared.fail(SIDE_SEND);
        }
        job.caller.unpark();
        if replies.send(r).is_err() {
            return;
        }
    }
}

fn send_job(
    stream: &mut TcpStream,
    job: &Job,
    shared: &Shared,
    tx: IoCtx<'_>,
    rank: usize,
    n: usize,
    words: &mut [u16],
) -> Result<(), CollectiveError> {
    let io = PipeIo { shared, buf: job.buf, other: &job.caller, wire: job.wire };
    match job.kind {
        JobKind::Broadcast { root } => {
            let items = Broadcast::new(rank, root, n).send_items(Broadcast::layout(job.len, job.chunk_elems));
            send_items(items, stream, &job.header, &tx, &io, words)
        }
        JobKind::AllReduce => {
            let items = AllReduce::new(rank, n).send_items(Layout::new(n, job.len, job.chunk_elems));
            send_items(items, stream, &job.header, &tx, &io, words)
        }
    }
}

/// Sends the op header and then `items`. The header rides with the first chunk, unless
/// that chunk must wait for data to arrive (a broadcast's middle ranks): then it goes out
/// alone first, so the next rank can validate the op early. A rank with nothing to send
/// still sends the header. `words` (at least one chunk long) is where a compressed op's
/// chunk is rounded to 16 bits.
fn send_items(
    items: impl Iterator<Item = Item>,
    stream: &mut TcpStream,
    header: &[u8],
    tx: &IoCtx<'_>,
    io: &PipeIo<'_>,
    words: &mut [u16],
) -> Result<(), CollectiveError> {
    let shared = io.shared;
    let mut pending_hdr = header;
    for it in items {
        if let Some(target) = it.after_other {
            if !pending_hdr.is_empty() {
                write_counted(tx, stream, pending_hdr, &[], shared)?;
                pending_hdr = &[];
            }
            if !wait_for(&shared.recv_done, target, shared, tx.abort) {
                return Err(failure_or_abort(tx.abort));
            }
        }
        // SAFETY: the counters guarantee the receiver isn't writing this range now
        // (`after_other`), and the caller keeps `buf` alive until we reply.
        let src = unsafe { std::slice::from_raw_parts(io.buf.0.add(it.start) as *const f32, it.len) };
        send_values(tx, stream, pending_hdr, src, io.wire, words, shared)?;
        pending_hdr = &[];
        shared.sent_done.store(it.done, Ordering::Release);
        io.other.unpark();
    }
    if !pending_hdr.is_empty() {
        write_counted(tx, stream, pending_hdr, &[], shared)?;
    }
    Ok(())
}
