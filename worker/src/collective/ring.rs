//! Ring all-reduce over direct TCP links.
//!
//! Rank r keeps two connections: it connects to (r+1)%N and sends on that link only, and
//! accepts from (r−1+N)%N and receives on that link only. All-reduce is reduce-scatter
//! followed by all-gather, each rank sending 2(N−1)/N·S bytes.
//!
//! Pipelining: a dedicated sender thread per ring writes while the calling thread reads
//! and sums. Every segment is cut into the same number of chunks C, so "step s, chunk c"
//! has the linear index s·C+c on both sides and the only cross-thread dependency is a
//! pair of counters:
//! * the sender may send chunk (s, c) once the receiver finished (s−1, c), because in a
//!   ring the segment sent at step s is exactly the one received at step s−1;
//! * the receiver may overwrite (s, c) only once the sender finished reading the same
//!   memory, which (segments rotate mod N) was chunk (s+1−N, c). A well-behaved peer
//!   can't cause a wait there, but the check keeps a misbehaving one from racing us.
//!
//! Only the chunk *timing* depends on C; the byte stream on a link is the same for any
//! chunking, so ranks may even use different chunk sizes.

use super::wire::{self, status, Ack, Hello, OpHeader, Role};
use super::{lock, AbortHandle, Collective, CollectiveError};
use cvdist_common::auth::constant_time_eq;
use rand::RngCore;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Default pipelining chunk: large enough that syscall and wake-up overhead is noise,
/// small enough to stay in L2 while it is summed right after being received.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;

/// Ops at most this large run entirely on the calling thread, alternating send and
/// receive per step: that skips two thread hand-offs per hop, and a step's message is
/// far below any socket buffer so the writes cannot block on each other.
const INLINE_MAX_BYTES: usize = 16 * 1024;

/// Upper bound for a single handshake round trip, so a half-open or silent client on
/// the data-plane port cannot stall connection setup for the whole timeout.
const HANDSHAKE_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Total time an incoming connection gets to complete the acceptor's side of the
/// handshake (hello, ack, proof: three small messages, well under a millisecond between
/// live peers). A deadline for the whole exchange, not per read, so a client that trickles
/// one byte at a time cannot hold a handshake slot for long.
const ACCEPT_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

/// Handshakes processed concurrently by the acceptor; more connections are dropped.
const MAX_PENDING_HANDSHAKES: usize = 16;

/// Handshakes in progress from one source address; more are dropped. A peer opens one
/// connection at a time, so this leaves room for retries while one slow or hostile host
/// cannot take all [`MAX_PENDING_HANDSHAKES`] slots.
const MAX_PENDING_PER_SOURCE: usize = 4;

/// How long a waiting thread sleeps before re-checking abort/failure flags on its own.
const PARK_SLICE: Duration = Duration::from_millis(20);

/// A connected ring of `world_size` ranks. See the module docs for the algorithm.
pub struct Ring {
    rank: usize,
    world: usize,
    next: usize,
    prev: usize,
    /// Link from `prev`; only the calling thread reads it.
    recv: TcpStream,
    /// Clone of the link to `next`, written by the calling thread only for inline ops
    /// (while the sender thread is idle).
    send_inline: TcpStream,
    scratch: Vec<f32>,
    chunk_elems: usize,
    op_timeout: Duration,
    seq: u64,
    abort: AbortHandle,
    shared: Arc<Shared>,
    jobs: Option<SyncSender<Job>>,
    replies: Receiver<Result<(), CollectiveError>>,
    sender: Option<JoinHandle<()>>,
    sender_thread: Thread,
    broken: Option<String>,
    /// Our sockets' registrations in `abort`, removed on drop.
    abort_ids: [u64; 2],
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
        for l in &self.links {
            let _ = l.shutdown(Shutdown::Both);
        }
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
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
    buf: BufPtr,
    len: usize,
    header: [u8; wire::OP_HEADER_LEN],
    /// Must equal the receiver's, since the two threads' counters index the same chunks.
    chunk_elems: usize,
    caller: Thread,
}

/// Chunk geometry shared by both threads of an all-reduce.
#[derive(Clone, Copy)]
struct Layout {
    n: usize,
    len: usize,
    chunks: usize,
}

impl Layout {
    fn new(n: usize, len: usize, chunk_elems: usize) -> Self {
        let max_seg = len.div_ceil(n);
        Layout { n, len, chunks: max_seg.div_ceil(chunk_elems.max(1)).max(1) }
    }

    /// Element range of segment `seg`; the first `len % n` segments get one extra.
    fn seg(&self, seg: usize) -> (usize, usize) {
        split(self.len, self.n, seg)
    }

    fn chunk(&self, seg: usize, c: usize) -> (usize, usize) {
        let (s0, slen) = self.seg(seg);
        let (c0, clen) = split(slen, self.chunks, c);
        (s0 + c0, clen)
    }
}

/// Start and length of part `i` when `len` is split into `parts` near-equal parts.
fn split(len: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = len / parts;
    let rem = len % parts;
    (i * base + i.min(rem), base + usize::from(i < rem))
}

fn as_bytes(s: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns, u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut(s: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

#[inline]
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Which op and peer an I/O error belongs to, to build the error variant.
#[derive(Clone, Copy)]
struct IoCtx<'a> {
    op: &'static str,
    peer: usize,
    timeout: Duration,
    abort: &'a AbortHandle,
}

impl IoCtx<'_> {
    fn map(&self, e: std::io::Error, what: &str) -> CollectiveError {
        if self.abort.is_aborted() {
            return self.abort.error();
        }
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                CollectiveError::Timeout { op: self.op, peer: self.peer, secs: self.timeout.as_secs_f64() }
            }
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => CollectiveError::PeerClosed { peer: self.peer },
            _ => CollectiveError::io(format!("{} {what} rank {}", self.op, self.peer), e),
        }
    }

    fn closed(&self) -> CollectiveError {
        if self.abort.is_aborted() {
            self.abort.error()
        } else {
            CollectiveError::PeerClosed { peer: self.peer }
        }
    }

    fn read_full(&self, s: &mut TcpStream, mut buf: &mut [u8]) -> Result<(), CollectiveError> {
        while !buf.is_empty() {
            match s.read(buf) {
                Ok(0) => return Err(self.closed()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.map(e, "receiving from")),
            }
        }
        Ok(())
    }

    /// Writes `first` then `second` with as few syscalls as possible (a small header
    /// rides in the same segment as the first chunk).
    fn write_full(&self, s: &mut TcpStream, mut first: &[u8], mut second: &[u8]) -> Result<(), CollectiveError> {
        while !first.is_empty() || !second.is_empty() {
            let r = if first.is_empty() {
                s.write(second)
            } else if second.is_empty() {
                s.write(first)
            } else {
                s.write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
            };
            match r {
                Ok(0) => return Err(self.closed()),
                Ok(mut n) => {
                    let a = n.min(first.len());
                    first = &first[a..];
                    n -= a;
                    second = &second[n..];
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.map(e, "sending to")),
            }
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
        let stop = Arc::new(SetupStop::default());

        let acceptor = {
            let (stop, abort, secret) = (stop.clone(), abort.clone(), secret.as_bytes().to_vec());
            let me = LinkSpec { rank, world: world_size, secret: Arc::new(secret) };
            thread::Builder::new()
                .name(format!("ring-accept-{rank}"))
                .spawn(move || accept_link(listener, me, prev, deadline, &stop, &abort))
                .map_err(|e| CollectiveError::io("spawning ring acceptor thread", e))?
        };
        let me = LinkSpec { rank, world: world_size, secret: Arc::new(secret.as_bytes().to_vec()) };
        let sent = connect_link(&me, next, &peers[next], deadline, &stop, &abort);
        if sent.is_err() {
            // The ring can't form; keep accepting only briefly, so that a predecessor
            // already trying to connect gets a definite answer (e.g. the same auth
            // failure) rather than "connection refused" until its timeout.
            *lock(&stop.linger_until) = Some(Instant::now() + SETUP_LINGER);
            stop.flag.store(true, Ordering::SeqCst);
        }
        let recv = acceptor.join().map_err(|_| CollectiveError::Protocol("ring acceptor thread panicked".into()))?;
        let (send, recv) = (sent?, recv?);

        let mut abort_ids = [0u64; 2];
        for (i, (s, peer)) in [(&send, next), (&recv, prev)].into_iter().enumerate() {
            s.set_nodelay(true).map_err(|e| CollectiveError::io(format!("TCP_NODELAY on link to rank {peer}"), e))?;
            abort_ids[i] = abort.register_stream(s)?;
        }
        let ring = Self::from_links(rank, world_size, send, recv, timeout, abort.clone(), abort_ids);
        if ring.is_err() {
            abort.unregister_streams(&abort_ids);
        }
        ring
    }

    fn from_links(
        rank: usize,
        world: usize,
        send: TcpStream,
        recv: TcpStream,
        op_timeout: Duration,
        abort: AbortHandle,
        abort_ids: [u64; 2],
    ) -> Result<Ring, CollectiveError> {
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let clone = |s: &TcpStream| s.try_clone().map_err(|e| CollectiveError::io("cloning ring socket", e));
        let shared = Arc::new(Shared {
            recv_done: AtomicUsize::new(0),
            sent_done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            first_failure: AtomicU8::new(0),
            links: [clone(&send)?, clone(&recv)?],
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
        let mut ring = Ring {
            rank,
            world,
            next,
            prev,
            recv,
            send_inline: send,
            scratch: Vec::new(),
            chunk_elems: 0,
            op_timeout,
            seq: 0,
            abort,
            shared,
            jobs: Some(job_tx),
            replies: reply_rx,
            sender: Some(sender),
            sender_thread,
            broken: None,
            abort_ids,
        };
        ring.set_chunk_bytes(DEFAULT_CHUNK_BYTES);
        ring.set_op_timeout(op_timeout)?;
        Ok(ring)
    }

    /// Pipelining granularity (rounded to whole floats, at least 1 KiB).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_elems = (bytes.max(1024)) / 4;
        self.scratch = vec![0.0; self.chunk_elems];
    }

    /// How long an op may wait on a peer with no progress before failing with
    /// [`CollectiveError::Timeout`]. This bounds idle time per read/write, not the
    /// whole op, so it must exceed the worst skew between ranks entering an op.
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
        for l in &self.shared.links {
            let _ = l.shutdown(Shutdown::Both);
        }
        e
    }

    fn run(&mut self, kind: u32, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.check_usable()?;
        let header = self.header(kind, root, buf.len());
        let op = wire::op::name(kind);
        let r = if std::mem::size_of_val(buf) <= INLINE_MAX_BYTES {
            self.run_inline(op, &header, kind, root, buf)
        } else {
            self.run_pipelined(op, &header, kind, root, buf)
        };
        r.map_err(|e| self.poison(e))
    }

    /// Small ops: both directions from the calling thread, step by step.
    fn run_inline(
        &mut self,
        op: &'static str,
        header: &OpHeader,
        kind: u32,
        root: usize,
        buf: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let (n, r, prev) = (self.world, self.rank, self.prev);
        let tx = IoCtx { op, peer: self.next, timeout: self.op_timeout, abort: &self.abort };
        let rx = IoCtx { op, peer: prev, timeout: self.op_timeout, abort: &self.abort };
        let (send, recv, scratch) = (&mut self.send_inline, &mut self.recv, &mut self.scratch);
        let hdr = header.encode();
        let check_header = |recv: &mut TcpStream| -> Result<(), CollectiveError> {
            let bytes = rx.read_full_arr::<{ wire::OP_HEADER_LEN }>(recv)?;
            check_header_bytes(&bytes, header, op, prev, r)
        };
        if kind == wire::op::BROADCAST {
            let pos = (r + n - root) % n;
            if pos == 0 {
                tx.write_full(send, &hdr, as_bytes(buf))?;
                // The last rank's header closes the loop and confirms it agreed on the op.
                return check_header(recv);
            }
            // Header first, so the next rank can validate while we wait for data.
            tx.write_full(send, &hdr, &[])?;
            check_header(recv)?;
            rx.read_full(recv, as_bytes_mut(buf))?;
            if pos < n - 1 {
                tx.write_full(send, &[], as_bytes(buf))?;
            }
            return Ok(());
        }
        let lay = Layout::new(n, buf.len(), usize::MAX);
        for s in 0..2 * (n - 1) {
            let (so, sl) = lay.seg((r + 2 * n - s) % n);
            let first = if s == 0 { &hdr[..] } else { &[] };
            tx.write_full(send, first, as_bytes(&buf[so..so + sl]))?;
            if s == 0 {
                check_header(recv)?;
            }
            let (ro, rl) = lay.seg((r + 2 * n - s - 1) % n);
            let dst = &mut buf[ro..ro + rl];
            if s < n - 1 {
                // A segment can exceed the scratch when chunk_bytes was set very small.
                for piece in dst.chunks_mut(scratch.len()) {
                    let tmp = &mut scratch[..piece.len()];
                    rx.read_full(recv, as_bytes_mut(tmp))?;
                    add_into(piece, tmp);
                }
            } else {
                rx.read_full(recv, as_bytes_mut(dst))?;
            }
        }
        if kind == wire::op::BARRIER && buf.first().is_some_and(|&v| v != n as f32) {
            return Err(CollectiveError::Protocol(format!("barrier counted {:?} ranks, expected {n}", buf.first())));
        }
        Ok(())
    }

    /// Large ops: the sender thread writes while this thread reads and sums.
    fn run_pipelined(
        &mut self,
        op: &'static str,
        header: &OpHeader,
        kind: u32,
        root: usize,
        buf: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let job_kind = if kind == wire::op::BROADCAST { JobKind::Broadcast { root } } else { JobKind::AllReduce };
        self.shared.recv_done.store(0, Ordering::SeqCst);
        self.shared.sent_done.store(0, Ordering::SeqCst);
        self.shared.failed.store(false, Ordering::SeqCst);
        self.shared.first_failure.store(0, Ordering::SeqCst);
        let job = Job {
            kind: job_kind,
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

impl IoCtx<'_> {
    fn read_full_arr<const N: usize>(&self, s: &mut TcpStream) -> Result<[u8; N], CollectiveError> {
        let mut b = [0u8; N];
        self.read_full(s, &mut b)?;
        Ok(b)
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
    scratch: &mut [f32],
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
    match kind {
        JobKind::Broadcast { root } => {
            let pos = (rank + n - root) % n;
            if pos == 0 {
                return Ok(());
            }
            let chunks = len.div_ceil(chunk_elems).max(1);
            for c in 0..chunks {
                let (o, l) = split(len, chunks, c);
                // SAFETY: chunk c is written only here and read by the sender only after
                // recv_done > c; `buf` outlives the op (ReplyGuard).
                let dst = unsafe { std::slice::from_raw_parts_mut(buf.0.add(o), l) };
                rx.read_full(stream, as_bytes_mut(dst))?;
                shared.recv_done.store(c + 1, Ordering::Release);
                sender.unpark();
            }
            Ok(())
        }
        JobKind::AllReduce => {
            let lay = Layout::new(n, len, chunk_elems);
            let cpc = lay.chunks;
            for s in 0..2 * (n - 1) {
                let seg = (rank + 2 * n - s - 1) % n;
                for c in 0..cpc {
                    if s + 1 >= n && !wait_for(&shared.sent_done, (s + 1 - n) * cpc + c + 1, shared, rx.abort) {
                        return Err(failure_or_abort(rx.abort));
                    }
                    let (o, l) = lay.chunk(seg, c);
                    // SAFETY: the counters above keep this range disjoint from what the
                    // sender thread is reading; `buf` outlives the op (ReplyGuard).
                    let dst = unsafe { std::slice::from_raw_parts_mut(buf.0.add(o), l) };
                    if s < n - 1 {
                        let tmp = &mut scratch[..l];
                        rx.read_full(stream, as_bytes_mut(tmp))?;
                        add_into(dst, tmp);
                    } else {
                        rx.read_full(stream, as_bytes_mut(dst))?;
                    }
                    shared.recv_done.store(s * cpc + c + 1, Ordering::Release);
                    sender.unpark();
                }
            }
            Ok(())
        }
    }
}

fn failure_or_abort(abort: &AbortHandle) -> CollectiveError {
    if abort.is_aborted() {
        abort.error()
    } else {
        // The other side recorded the real error; this one is discarded in favour of it.
        CollectiveError::Broken("peer thread failed".into())
    }
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
    while let Ok(job) = jobs.recv() {
        let timeout = stream.write_timeout().ok().flatten().unwrap_or(Duration::from_secs(0));
        let op = match job.kind {
            JobKind::AllReduce => "all_reduce",
            JobKind::Broadcast { .. } => "broadcast",
        };
        let tx = IoCtx { op, peer: next, timeout, abort: &abort };
        let r = send_job(&mut stream, &job, &shared, tx, rank, n);
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
) -> Result<(), CollectiveError> {
    let mut pending_hdr: &[u8] = &job.header;
    let buf = job.buf;
    let chunk_src = |o: usize, l: usize| {
        // SAFETY: the counters guarantee the receiver isn't writing this range now, and
        // the caller keeps `buf` alive until we reply.
        unsafe { std::slice::from_raw_parts(buf.0.add(o) as *const f32, l) }
    };
    match job.kind {
        JobKind::Broadcast { root } => {
            let pos = (rank + n - root) % n;
            if pos < n - 1 {
                let chunk_elems = job.chunk_elems;
                let chunks = job.len.div_ceil(chunk_elems).max(1);
                for c in 0..chunks {
                    if pos > 0 {
                        // Header goes out first so the next rank can validate early.
                        if !pending_hdr.is_empty() {
                            tx.write_full(stream, pending_hdr, &[])?;
                            pending_hdr = &[];
                        }
                        if !wait_for(&shared.recv_done, c + 1, shared, tx.abort) {
                            return Err(failure_or_abort(tx.abort));
                        }
                    }
                    let (o, l) = split(job.len, chunks, c);
                    tx.write_full(stream, pending_hdr, as_bytes(chunk_src(o, l)))?;
                    pending_hdr = &[];
                }
            }
        }
        JobKind::AllReduce => {
            let chunk_elems = job.chunk_elems;
            let lay = Layout::new(n, job.len, chunk_elems);
            let cpc = lay.chunks;
            for s in 0..2 * (n - 1) {
                let seg = (rank + 2 * n - s) % n;
                for c in 0..cpc {
                    if s >= 1 && !wait_for(&shared.recv_done, (s - 1) * cpc + c + 1, shared, tx.abort) {
                        return Err(failure_or_abort(tx.abort));
                    }
                    let (o, l) = lay.chunk(seg, c);
                    tx.write_full(stream, pending_hdr, as_bytes(chunk_src(o, l)))?;
                    pending_hdr = &[];
                    shared.sent_done.store(s * cpc + c + 1, Ordering::Release);
                    job.caller.unpark();
                }
            }
        }
    }
    if !pending_hdr.is_empty() {
        tx.write_full(stream, pending_hdr, &[])?;
    }
    Ok(())
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
        for l in &self.shared.links {
            let _ = l.shutdown(Shutdown::Both);
        }
        // Closing the job channel ends the sender loop.
        self.jobs = None;
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        self.abort.unregister_streams(&self.abort_ids);
    }
}

// ---------------------------------------------------------------------------------
// Connection setup

/// How long the acceptor keeps answering after our own link failed during setup.
const SETUP_LINGER: Duration = Duration::from_secs(2);

/// Tells the acceptor thread that setup failed on the connecting side.
#[derive(Default)]
struct SetupStop {
    flag: AtomicBool,
    linger_until: std::sync::Mutex<Option<Instant>>,
}

struct LinkSpec {
    rank: usize,
    world: usize,
    secret: Arc<Vec<u8>>,
}

fn handshake_timeout(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(50), HANDSHAKE_IO_TIMEOUT)
}

/// Connector side: retry connecting to `peers[next]` until the deadline, then run the
/// handshake. Explicit rejections (auth, wrong rank/world/version) fail at once because
/// retrying can't fix them.
fn connect_link(
    me: &LinkSpec,
    next: usize,
    addr: &str,
    deadline: Instant,
    stop: &SetupStop,
    abort: &AbortHandle,
) -> Result<TcpStream, CollectiveError> {
    let mut last_err = String::from("no attempt made");
    loop {
        abort.check()?;
        if stop.flag.load(Ordering::SeqCst) {
            return Err(CollectiveError::Broken("ring setup stopped".into()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CollectiveError::Io {
                context: format!("connecting to rank {next} at {addr} (timed out; last error: {last_err})"),
                source: std::io::Error::new(ErrorKind::TimedOut, "ring connect timed out"),
            });
        }
        let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_err = format!("resolving {addr}: {e}");
                Vec::new()
            }
        };
        for sa in addrs {
            let budget = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(3));
            if budget.is_zero() {
                break;
            }
            match connect_unless_aborted(sa, budget, abort)? {
                Ok(s) => {
                    // Registered for the handshake, so an abort cuts a silent peer's read
                    // short instead of waiting out HANDSHAKE_IO_TIMEOUT.
                    let id = abort.register_stream(&s)?;
                    let shaken = handshake_connector(me, next, s, deadline);
                    abort.unregister_streams(&[id]);
                    abort.check()?;
                    match shaken {
                        Ok(s) => return Ok(s),
                        Err(HandshakeFail::Fatal(e)) => return Err(e),
                        Err(HandshakeFail::Retry(e)) => last_err = e,
                    }
                }
                Err(e) => last_err = format!("{sa}: {e}"),
            }
        }
        // Retry pause, cut short by an abort.
        let resume = Instant::now() + Duration::from_millis(50);
        while Instant::now() < resume {
            abort.check()?;
            thread::sleep(SETUP_POLL);
        }
    }
}

/// How often a wait during ring setup re-checks the abort flag.
const SETUP_POLL: Duration = Duration::from_millis(20);

/// `TcpStream::connect_timeout` that returns `Err(Aborted)` within [`SETUP_POLL`] of an
/// abort: std cannot interrupt a blocking connect (to an unreachable host it lasts the
/// whole budget), so it runs on a short-lived helper thread that is left to finish alone.
fn connect_unless_aborted(
    sa: SocketAddr,
    budget: Duration,
    abort: &AbortHandle,
) -> Result<std::io::Result<TcpStream>, CollectiveError> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("ring-dial".into())
        .spawn(move || {
            let _ = tx.send(TcpStream::connect_timeout(&sa, budget));
        })
        .map_err(|e| CollectiveError::io("spawning ring dial thread", e))?;
    loop {
        match rx.recv_timeout(SETUP_POLL) {
            Ok(r) => return Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => abort.check()?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(Err(std::io::Error::other("ring dial thread ended without a result")))
            }
        }
    }
}

enum HandshakeFail {
    /// The peer said no, or proved it doesn't hold the secret.
    Fatal(CollectiveError),
    /// Transport trouble; the peer may simply not be ready.
    Retry(String),
}

fn handshake_connector(
    me: &LinkSpec,
    next: usize,
    mut s: TcpStream,
    deadline: Instant,
) -> Result<TcpStream, HandshakeFail> {
    let io_t = Some(handshake_timeout(deadline));
    let retry =
        |what: &str, e: std::io::Error| HandshakeFail::Retry(format!("handshake with rank {next}: {what}: {e}"));
    s.set_read_timeout(io_t).and_then(|_| s.set_write_timeout(io_t)).map_err(|e| retry("socket options", e))?;
    let mut nonce_c = [0u8; wire::NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce_c);
    let hello =
        Hello { version: wire::VERSION, world: me.world as u32, from: me.rank as u32, to: next as u32, nonce: nonce_c };
    wire::write_all(&mut s, &hello.encode()).map_err(|e| retry("sending hello", e))?;
    let ack_bytes = wire::read_array::<{ wire::ACK_LEN }>(&mut s).map_err(|e| retry("reading ack", e))?;
    let ack = Ack::decode(&ack_bytes).map_err(|_| {
        HandshakeFail::Fatal(CollectiveError::Protocol(format!(
            "the address of rank {next} did not answer with the cvdist ring handshake"
        )))
    })?;
    if ack.status != status::OK {
        return Err(HandshakeFail::Fatal(CollectiveError::Protocol(format!(
            "rank {next} rejected our link ({}): it is rank {} of world {} (protocol v{}), we are rank {} of world {} (v{}) expecting it to be rank {next}",
            status::describe(ack.status),
            ack.rank,
            ack.world,
            ack.version,
            me.rank,
            me.world,
            wire::VERSION
        ))));
    }
    if ack.rank as usize != next || ack.world as usize != me.world {
        return Err(HandshakeFail::Fatal(CollectiveError::Protocol(format!(
            "expected rank {next} of world {} at its address, found rank {} of world {}",
            me.world, ack.rank, ack.world
        ))));
    }
    let expect =
        wire::link_mac(&me.secret, Role::Acceptor, me.world as u32, me.rank as u32, next as u32, &nonce_c, &ack.nonce);
    if !constant_time_eq(&expect, &ack.mac) {
        return Err(HandshakeFail::Fatal(CollectiveError::Auth { peer: next }));
    }
    let proof =
        wire::link_mac(&me.secret, Role::Connector, me.world as u32, me.rank as u32, next as u32, &nonce_c, &ack.nonce);
    wire::write_all(&mut s, &proof).map_err(|e| retry("sending proof", e))?;
    let verdict = wire::read_array::<{ wire::VERDICT_LEN }>(&mut s).map_err(|e| retry("reading verdict", e))?;
    match u32::from_le_bytes(verdict) {
        status::OK => Ok(s),
        status::AUTH_FAILED => Err(HandshakeFail::Fatal(CollectiveError::Auth { peer: next })),
        other => Err(HandshakeFail::Fatal(CollectiveError::Protocol(format!(
            "rank {next} rejected our link: {}",
            status::describe(other)
        )))),
    }
}

/// Outcome of one incoming connection's handshake.
enum Incoming {
    Accepted(TcpStream),
    /// Rejected; `auth` when it claimed to be our predecessor but failed the MAC.
    Rejected {
        reason: String,
        auth: bool,
    },
}

/// Acceptor side: accept connections until one completes the handshake as `prev`.
/// Each connection is handshaken on its own short-lived thread so that garbage or a
/// silent client can't delay the real peer.
fn accept_link(
    listener: TcpListener,
    me: LinkSpec,
    prev: usize,
    deadline: Instant,
    stop: &SetupStop,
    abort: &AbortHandle,
) -> Result<TcpStream, CollectiveError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::io("making the data-plane listener non-blocking", e))?;
    let me = Arc::new(me);
    let (tx, rx) = std::sync::mpsc::channel::<Incoming>();
    let pending = Arc::new(AtomicUsize::new(0));
    let per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
    // Dropped connections are logged once per source and setup, not once each: a flood
    // must not turn into a flood of log lines.
    let mut dropped_logged = std::collections::HashSet::new();
    let mut last_reject: Option<(String, bool)> = None;
    let mut handled_any = false;
    loop {
        abort.check()?;
        while let Ok(inc) = rx.try_recv() {
            handled_any = true;
            match inc {
                Incoming::Accepted(s) => return Ok(s),
                Incoming::Rejected { reason, auth } => {
                    if auth || last_reject.as_ref().is_none_or(|(_, a)| !a) {
                        last_reject = Some((reason, auth));
                    }
                }
            }
        }
        if stop.flag.load(Ordering::SeqCst) {
            let linger_over = lock(&stop.linger_until).is_none_or(|t| Instant::now() >= t);
            if linger_over || handled_any {
                return Err(CollectiveError::Broken("ring setup stopped".into()));
            }
        }
        if Instant::now() >= deadline {
            return Err(match last_reject {
                Some((_, true)) => CollectiveError::Auth { peer: prev },
                Some((reason, false)) => CollectiveError::Io {
                    context: format!(
                        "waiting for rank {prev} to connect (timed out; last rejected connection: {reason})"
                    ),
                    source: std::io::Error::new(ErrorKind::TimedOut, "ring accept timed out"),
                },
                None => CollectiveError::Io {
                    context: format!("waiting for rank {prev} to connect (timed out)"),
                    source: std::io::Error::new(ErrorKind::TimedOut, "ring accept timed out"),
                },
            });
        }
        match listener.accept() {
            Ok((s, from)) => {
                let ip = from.ip();
                let from_ip = lock(&per_source).get(&ip).copied().unwrap_or(0);
                let full = pending.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES;
                if full || from_ip >= MAX_PENDING_PER_SOURCE {
                    if dropped_logged.insert(ip) {
                        let why = if full {
                            "too many pending data-plane handshakes"
                        } else {
                            "too many pending handshakes from one address"
                        };
                        tracing::warn!(rank = me.rank, %from, "{why}; dropping connections (logged once per address)");
                    }
                    continue;
                }
                pending.fetch_add(1, Ordering::SeqCst);
                *lock(&per_source).entry(ip).or_insert(0) += 1;
                // Frees both counts when the handshake thread ends, or at once if it can't start.
                let slot = HandshakeSlot { ip, pending: pending.clone(), per_source: per_source.clone() };
                let (tx, me_t) = (tx.clone(), me.clone());
                let spawned = thread::Builder::new().name("ring-handshake".into()).spawn(move || {
                    let _slot = slot;
                    let until = deadline.min(Instant::now() + ACCEPT_HANDSHAKE_DEADLINE);
                    let r = match handshake_acceptor(&me_t, prev, s, until) {
                        Ok(s) => Incoming::Accepted(s),
                        Err((reason, auth)) => {
                            // Logged here, not by the acceptor loop: once the real peer is
                            // in, that loop is gone and would drop rejections still in flight.
                            let reason = format!("{from}: {reason}");
                            tracing::warn!(rank = me_t.rank, "rejected data-plane connection: {reason}");
                            Incoming::Rejected { reason, auth }
                        }
                    };
                    let _ = tx.send(r);
                });
                if let Err(e) = spawned {
                    tracing::warn!(rank = me.rank, "cannot start a handshake thread: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                // Poll: std has no accept-with-timeout, and this only runs during setup.
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(Incoming::Accepted(s)) => return Ok(s),
                    Ok(Incoming::Rejected { reason, auth }) => {
                        handled_any = true;
                        if auth || last_reject.as_ref().is_none_or(|(_, a)| !a) {
                            last_reject = Some((reason, auth));
                        }
                    }
                    Err(_) => {}
                }
            }
            // Transient accept failures (e.g. ECONNABORTED, EMFILE) shouldn't end setup.
            Err(e) => {
                tracing::warn!(rank = me.rank, "data-plane accept failed: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// One handshake's share of the acceptor's limits; released on drop.
struct HandshakeSlot {
    ip: std::net::IpAddr,
    pending: Arc<AtomicUsize>,
    per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let mut map = lock(&self.per_source);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Reads exactly `N` bytes before `until`, however the peer spaces them out.
fn read_array_by<const N: usize>(s: &mut TcpStream, until: Instant) -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "handshake deadline passed"));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(std::io::Error::new(ErrorKind::TimedOut, "handshake deadline passed"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Returns the stream or (reason, was-auth-failure). The whole exchange must finish by
/// `until` (see [`ACCEPT_HANDSHAKE_DEADLINE`]).
fn handshake_acceptor(
    me: &LinkSpec,
    prev: usize,
    mut s: TcpStream,
    until: Instant,
) -> Result<TcpStream, (String, bool)> {
    let io_t = Some(handshake_timeout(until));
    let io = |what: &str, e: std::io::Error| (format!("{what}: {e}"), false);
    // Accepted sockets may inherit O_NONBLOCK from the listener on some platforms.
    s.set_nonblocking(false).map_err(|e| io("socket options", e))?;
    s.set_read_timeout(io_t).and_then(|_| s.set_write_timeout(io_t)).map_err(|e| io("socket options", e))?;
    let hello_bytes = read_array_by::<{ wire::HELLO_LEN }>(&mut s, until).map_err(|e| io("reading hello", e))?;
    let hello =
        Hello::decode(&hello_bytes).map_err(|_| ("not a cvdist ring handshake (bad magic)".to_string(), false))?;
    let mut nonce_a = [0u8; wire::NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce_a);
    let reply = |s: &mut TcpStream, code: u32, mac: [u8; wire::MAC_LEN]| {
        let ack = Ack {
            version: wire::VERSION,
            world: me.world as u32,
            rank: me.rank as u32,
            status: code,
            nonce: nonce_a,
            mac,
        };
        wire::write_all(s, &ack.encode())
    };
    let code = if hello.version != wire::VERSION {
        status::BAD_VERSION
    } else if hello.world as usize != me.world {
        status::WRONG_WORLD
    } else if hello.to as usize != me.rank || hello.from as usize != prev {
        status::WRONG_RANK
    } else {
        status::OK
    };
    if code != status::OK {
        let _ = reply(&mut s, code, [0; wire::MAC_LEN]);
        return Err((
            format!(
                "{}: peer claims rank {} of world {} (v{}) linking to rank {}; expected rank {prev} of world {} linking to us (rank {})",
                status::describe(code),
                hello.from,
                hello.world,
                hello.version,
                hello.to,
                me.world,
                me.rank
            ),
            false,
        ));
    }
    let world = me.world as u32;
    let (c, a) = (prev as u32, me.rank as u32);
    let mac_a = wire::link_mac(&me.secret, Role::Acceptor, world, c, a, &hello.nonce, &nonce_a);
    reply(&mut s, status::OK, mac_a).map_err(|e| io("sending ack", e))?;
    let proof = read_array_by::<{ wire::PROOF_LEN }>(&mut s, until).map_err(|e| io("reading proof", e))?;
    let expect = wire::link_mac(&me.secret, Role::Connector, world, c, a, &hello.nonce, &nonce_a);
    if !constant_time_eq(&expect, &proof) {
        let _ = wire::write_all(&mut s, &status::AUTH_FAILED.to_le_bytes());
        return Err((format!("rank {prev} failed authentication (wrong job secret)"), true));
    }
    wire::write_all(&mut s, &status::OK.to_le_bytes()).map_err(|e| io("sending verdict", e))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_range_exactly() {
        for len in [0usize, 1, 2, 7, 100, 1001] {
            for parts in 1..6 {
                let mut next = 0;
                for i in 0..parts {
                    let (o, l) = split(len, parts, i);
                    assert_eq!(o, next);
                    next = o + l;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn layout_chunks_tile_each_segment() {
        let lay = Layout::new(3, 1_000_003, 4096);
        let mut covered = 0;
        for seg in 0..3 {
            for c in 0..lay.chunks {
                let (o, l) = lay.chunk(seg, c);
                assert_eq!(o, covered);
                covered += l;
                assert!(l <= 4096);
            }
        }
        assert_eq!(covered, 1_000_003);
    }
}
