//! The pipelined path for large ops: a dedicated sender thread writes while the calling
//! thread reads and sums.
//!
//! Every segment is cut into the same number of chunks C, so "step s, chunk c" has the
//! linear index s·C+c on both sides and the only cross-thread dependency is a pair of
//! counters:
//! * the sender may send chunk (s, c) once the receiver finished (s−1, c), because in a
//!   ring the segment sent at step s is exactly the one received at step s−1;
//! * the receiver may overwrite (s, c) only once the sender finished reading the same
//!   memory, which (segments rotate mod N) was chunk (s+1−N, c). A well-behaved peer
//!   can't cause a wait there, but the check keeps a misbehaving one from racing us.
//!
//! Only the chunk *timing* depends on C; the byte stream on a link is the same for any
//! chunking, so ranks may even use different chunk sizes.

use super::check_header_bytes;
use super::chunk_io::{recv_values, send_values, write_counted, LinkStats, Scratch};
use crate::collective::compress::Wire;
use crate::collective::io_error::{failure_or_abort, IoCtx};
use crate::collective::schedule::{AllReduce, Broadcast, Item, Layout};
use crate::collective::wire::{self, OpHeader};
use crate::collective::{AbortHandle, CollectiveError};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

/// How long a waiting thread sleeps before re-checking abort/failure flags on its own.
const PARK_SLICE: Duration = Duration::from_millis(20);

/// The sender thread of one rank and the state it shares with the calling thread.
pub(super) struct Pipeline {
    rank: usize,
    world: usize,
    /// Must be the same for both threads of an op, since their counters index the same
    /// chunks.
    chunk_elems: usize,
    shared: Arc<Shared>,
    work: Option<SyncSender<SendWork>>,
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
    stats: LinkStats,
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
}

#[derive(Clone, Copy)]
enum OpKind {
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

/// What the sender thread is to send for one op.
struct SendWork {
    kind: OpKind,
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

impl Pipeline {
    /// Starts the sender thread of rank `rank` (of `world`) on the link `send`; `recv`
    /// is the link from the previous rank, shut down with `send` when an op fails.
    pub fn start(
        rank: usize,
        world: usize,
        send: &TcpStream,
        recv: &TcpStream,
        abort: &AbortHandle,
    ) -> Result<Pipeline, CollectiveError> {
        let next = (rank + 1) % world;
        let clone = |s: &TcpStream| s.try_clone().map_err(|e| CollectiveError::io("cloning ring socket", e));
        let shared = Arc::new(Shared {
            recv_done: AtomicUsize::new(0),
            sent_done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            first_failure: AtomicU8::new(0),
            links: [clone(send)?, clone(recv)?],
            stats: LinkStats::default(),
        });
        let (work_tx, work_rx) = sync_channel::<SendWork>(1);
        let (reply_tx, reply_rx) = sync_channel(1);
        let sender = {
            let (shared, abort, stream) = (shared.clone(), abort.clone(), clone(send)?);
            thread::Builder::new()
                .name(format!("ring-send-{rank}"))
                .spawn(move || sender_loop(stream, next, world, rank, work_rx, reply_tx, shared, abort))
                .map_err(|e| CollectiveError::io("spawning ring sender thread", e))?
        };
        let sender_thread = sender.thread().clone();
        abort.register_thread(sender_thread.clone());
        Ok(Pipeline {
            rank,
            world,
            chunk_elems: 0,
            shared,
            work: Some(work_tx),
            replies: reply_rx,
            sender: Some(sender),
            sender_thread,
        })
    }

    pub fn set_chunk_elems(&mut self, elems: usize) {
        self.chunk_elems = elems;
    }

    pub fn stats(&self) -> &LinkStats {
        &self.shared.stats
    }

    pub fn shutdown_links(&self) {
        self.shared.shutdown_links();
    }

    /// Stops the sender thread and waits for it; the links are shut down first so that
    /// a blocked write returns. Idempotent.
    pub fn stop(&mut self) {
        self.shutdown_links();
        // Closing the work channel ends the sender loop.
        self.work = None;
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }

    /// Runs the op that `header` describes (`root` for a broadcast) on `buf`: the sender
    /// thread sends while this thread receives from `recv` (through `rx`) into `buf`,
    /// chunk by chunk.
    pub fn run(
        &mut self,
        recv: &mut TcpStream,
        scratch: &mut Scratch,
        rx: IoCtx<'_>,
        header: &OpHeader,
        root: usize,
        buf: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let kind = header.kind;
        let op_kind = if kind == wire::op::BROADCAST { OpKind::Broadcast { root } } else { OpKind::AllReduce };
        self.shared.recv_done.store(0, Ordering::SeqCst);
        self.shared.sent_done.store(0, Ordering::SeqCst);
        self.shared.failed.store(false, Ordering::SeqCst);
        self.shared.first_failure.store(0, Ordering::SeqCst);
        let work = SendWork {
            kind: op_kind,
            wire: wire::op::wire(kind),
            op: rx.op,
            buf: BufPtr(buf.as_mut_ptr()),
            len: buf.len(),
            header: header.encode(),
            chunk_elems: self.chunk_elems,
            caller: thread::current(),
        };
        let work_tx = self.work.as_ref().ok_or_else(|| CollectiveError::Broken("sender thread stopped".into()))?;
        work_tx.send(work).map_err(|_| CollectiveError::Broken("ring sender thread exited".into()))?;
        // From here the sender thread may touch `buf`; the guard makes sure we don't
        // return (or unwind) before it has replied.
        let mut guard = ReplyGuard { replies: &self.replies, shared: &self.shared, done: false };
        let ptr = BufPtr(buf.as_mut_ptr());
        let len = buf.len();
        let receiving = Receiving {
            stream: recv,
            scratch,
            chunk_elems: self.chunk_elems,
            shared: &self.shared,
            rx,
            rank: self.rank,
            world: self.world,
            sender: &self.sender_thread,
        };
        let recv_res = receiving.run(op_kind, ptr, len, header);
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
struct Receiving<'a> {
    stream: &'a mut TcpStream,
    scratch: &'a mut Scratch,
    chunk_elems: usize,
    shared: &'a Shared,
    rx: IoCtx<'a>,
    rank: usize,
    world: usize,
    sender: &'a Thread,
}

impl Receiving<'_> {
    fn run(self, kind: OpKind, buf: BufPtr, len: usize, header: &OpHeader) -> Result<(), CollectiveError> {
        let Receiving { stream, scratch, chunk_elems, shared, rx, rank, world: n, sender } = self;
        let bytes = rx.read_full_arr::<{ wire::OP_HEADER_LEN }>(stream)?;
        check_header_bytes(&bytes, header, rx.op, rx.peer, rank)?;
        let io = PipeIo { shared, buf, other: sender, wire: wire::op::wire(header.kind) };
        match kind {
            OpKind::Broadcast { root } => {
                let items = Broadcast::new(rank, root, n).recv_items(Broadcast::layout(len, chunk_elems));
                receive_items(items, stream, scratch, &rx, &io)
            }
            OpKind::AllReduce => {
                let items = AllReduce::new(rank, n).recv_items(Layout::new(n, len, chunk_elems));
                receive_items(items, stream, scratch, &rx, &io)
            }
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
        recv_values(rx, stream, dst, it.reduces, it.completes, io.wire, scratch, &shared.stats)?;
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
    work_rx: Receiver<SendWork>,
    replies: SyncSender<Result<(), CollectiveError>>,
    shared: Arc<Shared>,
    abort: AbortHandle,
) {
    // Where a compressed op's chunks are rounded to 16 bits before they are written; grown
    // to the op's chunk size on first use.
    let mut words: Vec<u16> = Vec::new();
    while let Ok(work) = work_rx.recv() {
        let timeout = stream.write_timeout().ok().flatten().unwrap_or(Duration::from_secs(0));
        let tx = IoCtx { op: work.op, peer: next, timeout, abort: &abort };
        if words.len() < work.chunk_elems.max(1) {
            words.resize(work.chunk_elems.max(1), 0);
        }
        let r = send_work(&mut stream, &work, &shared, tx, rank, n, &mut words);
        if r.is_err() {
            shared.fail(SIDE_SEND);
        }
        work.caller.unpark();
        if replies.send(r).is_err() {
            return;
        }
    }
}

fn send_work(
    stream: &mut TcpStream,
    work: &SendWork,
    shared: &Shared,
    tx: IoCtx<'_>,
    rank: usize,
    n: usize,
    words: &mut [u16],
) -> Result<(), CollectiveError> {
    let io = PipeIo { shared, buf: work.buf, other: &work.caller, wire: work.wire };
    match work.kind {
        OpKind::Broadcast { root } => {
            let items = Broadcast::new(rank, root, n).send_items(Broadcast::layout(work.len, work.chunk_elems));
            send_items(items, stream, &work.header, &tx, &io, words)
        }
        OpKind::AllReduce => {
            let items = AllReduce::new(rank, n).send_items(Layout::new(n, work.len, work.chunk_elems));
            send_items(items, stream, &work.header, &tx, &io, words)
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
                write_counted(tx, stream, pending_hdr, &[], &shared.stats)?;
                pending_hdr = &[];
            }
            if !wait_for(&shared.recv_done, target, shared, tx.abort) {
                return Err(failure_or_abort(tx.abort));
            }
        }
        // SAFETY: the counters guarantee the receiver isn't writing this range now
        // (`after_other`), and the caller keeps `buf` alive until we reply.
        let src = unsafe { std::slice::from_raw_parts(io.buf.0.add(it.start) as *const f32, it.len) };
        send_values(tx, stream, pending_hdr, src, io.wire, words, &shared.stats)?;
        pending_hdr = &[];
        shared.sent_done.store(it.done, Ordering::Release);
        io.other.unpark();
    }
    if !pending_hdr.is_empty() {
        write_counted(tx, stream, pending_hdr, &[], &shared.stats)?;
    }
    Ok(())
}
