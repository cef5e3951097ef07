//! The ring schedule: which part of the buffer each rank sends and receives at each step,
//! written once and used by both executors (inline and pipelined) and both of the
//! pipelined executor's threads.
//!
//! Rank r sends only to `next = (r+1) % N` and receives only from `prev = (r−1+N) % N`.
//!
//! **All-reduce** = reduce-scatter then all-gather, `2(N−1)` steps. The buffer is cut into N
//! segments ([`Layout::seg`]); at step s rank r sends segment `(r−s) mod N` and receives
//! segment `(r−s−1) mod N`, which is exactly what `prev` sends at that step. During the
//! first `N−1` steps the received data is added to ours ([`AllReduce::reduces`]); after
//! them rank r holds the full sum of segment `(r+1) mod N`, and the last `N−1` steps
//! pass the finished segments around, overwriting.
//!
//! **Broadcast** is a chain from the root: a rank's [`Broadcast::position`] is its
//! distance from the root along the ring. Position 0 only sends, the last position only
//! receives, everyone else receives and forwards.
//!
//! For pipelining every segment is cut into the same number of chunks ([`Layout::chunks`]),
//! so "step s, chunk c" has the same linear index `s·C+c` on both threads of a rank; the
//! two dependencies between the threads are [`AllReduce::send_waits_for_received`] and
//! [`AllReduce::recv_waits_for_sent`].

/// Start and length of part `i` when `len` is split into `parts` near-equal parts; the
/// first `len % parts` parts get one element more.
#[inline]
pub(super) fn split(len: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = len / parts;
    let rem = len % parts;
    (i * base + i.min(rem), base + usize::from(i < rem))
}

/// Pipelining progress counter value once chunk `c` of `step` is done: items are counted
/// in schedule order, `step·chunks + c`, so "done through (s, c)" is `s·chunks + c + 1`.
#[inline]
pub(super) fn items_through(step: usize, c: usize, chunks: usize) -> usize {
    step * chunks + c + 1
}

/// One chunk's turn on one of a rank's two links, in schedule order: what to send or
/// receive, and the progress the rank's other thread must have made first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Item {
    pub step: usize,
    pub chunk: usize,
    /// Start and length in elements of the buffer range sent or received.
    pub start: usize,
    pub len: usize,
    /// Received data is added to ours (reduce-scatter) rather than copied over it.
    pub reduces: bool,
    /// After this item's addition the range holds the sum over every rank (the last
    /// reduce-scatter step): a compressed op rounds it here, before forwarding it.
    pub completes: bool,
    /// The other thread's progress counter must reach this before the item may start
    /// (the pipelining dependencies of the module docs); `None`: no shared memory.
    pub after_other: Option<usize>,
    /// This thread's progress counter once the item is done ([`items_through`]).
    pub done: usize,
}

/// How a buffer of `len` elements is cut into `n` segments of `chunks` chunks each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    n: usize,
    len: usize,
    /// Chunks per segment: enough that no chunk exceeds the `chunk_elems` given to
    /// [`Layout::new`], and at least 1 (an empty buffer still has one empty chunk).
    pub chunks: usize,
}

impl Layout {
    /// `n` segments (the world size for an all-reduce, 1 for a broadcast, which sends the
    /// whole buffer) in chunks of at most `chunk_elems` elements.
    pub fn new(n: usize, len: usize, chunk_elems: usize) -> Self {
        let max_seg = len.div_ceil(n);
        Layout { n, len, chunks: max_seg.div_ceil(chunk_elems.max(1)).max(1) }
    }

    /// Start and length (in elements) of segment `seg`.
    #[inline]
    pub fn seg(&self, seg: usize) -> (usize, usize) {
        split(self.len, self.n, seg)
    }

    /// Start and length (in elements, from the buffer's start) of chunk `c` of segment `seg`.
    #[inline]
    pub fn chunk(&self, seg: usize, c: usize) -> (usize, usize) {
        let (s0, slen) = self.seg(seg);
        let (c0, clen) = split(slen, self.chunks, c);
        (s0 + c0, clen)
    }
}

/// One rank's all-reduce schedule in a ring of `n`.
#[derive(Clone, Copy, Debug)]
pub(super) struct AllReduce {
    rank: usize,
    n: usize,
}

impl AllReduce {
    pub fn new(rank: usize, n: usize) -> Self {
        debug_assert!(rank < n);
        AllReduce { rank, n }
    }

    /// Number of steps: `N−1` of reduce-scatter, then `N−1` of all-gather.
    pub fn steps(&self) -> usize {
        2 * (self.n - 1)
    }

    /// The segment this rank sends to `next` at `step`.
    #[inline]
    pub fn send_segment(&self, step: usize) -> usize {
        (self.rank + 2 * self.n - step) % self.n
    }

    /// The segment this rank receives from `prev` at `step`.
    #[inline]
    pub fn recv_segment(&self, step: usize) -> usize {
        (self.rank + 2 * self.n - step - 1) % self.n
    }

    /// Whether data received at `step` is added to ours (reduce-scatter) rather than
    /// copied over it (all-gather).
    #[inline]
    pub fn reduces(&self, step: usize) -> bool {
        step < self.n - 1
    }

    /// Whether the segment received at `step` holds the full sum once it is added: the
    /// last reduce-scatter step, `N−2`.
    #[inline]
    pub fn completes(&self, step: usize) -> bool {
        step + 2 == self.n
    }

    /// Pipelining: how many receive items (linear `step·chunks + c` indices) must be
    /// complete before chunk `c` of `step` may be sent. The segment sent at step s is
    /// the one received at step s−1, so chunk c of it must have arrived; `None` at step 0,
    /// which sends our own data.
    #[inline]
    pub fn send_waits_for_received(&self, step: usize, c: usize, chunks: usize) -> Option<usize> {
        (step >= 1).then(|| items_through(step - 1, c, chunks))
    }

    /// Pipelining: how many send items must be complete before chunk `c` of `step` may
    /// be received into the buffer. The segment received at step s was last read by the
    /// sender at step s+1−N (segments come round every N steps); before that no memory
    /// is shared, so `None`.
    #[inline]
    pub fn recv_waits_for_sent(&self, step: usize, c: usize, chunks: usize) -> Option<usize> {
        (step + 1 >= self.n).then(|| items_through(step + 1 - self.n, c, chunks))
    }

    /// What this rank sends to `next`, chunk by chunk, for a buffer cut as `lay`.
    pub fn send_items(self, lay: Layout) -> impl Iterator<Item = Item> {
        self.items(lay, Self::send_segment, Self::send_waits_for_received)
    }

    /// What this rank receives from `prev`, chunk by chunk, for a buffer cut as `lay`.
    pub fn recv_items(self, lay: Layout) -> impl Iterator<Item = Item> {
        self.items(lay, Self::recv_segment, Self::recv_waits_for_sent)
    }

    fn items(
        self,
        lay: Layout,
        segment: fn(&Self, usize) -> usize,
        waits: fn(&Self, usize, usize, usize) -> Option<usize>,
    ) -> impl Iterator<Item = Item> {
        (0..self.steps()).flat_map(move |step| {
            let seg = segment(&self, step);
            (0..lay.chunks).map(move |chunk| {
                let (start, len) = lay.chunk(seg, chunk);
                Item {
                    step,
                    chunk,
                    start,
                    len,
                    reduces: self.reduces(step),
                    // Only meaningful for what is received; a sent item's flag is unused.
                    completes: self.completes(step),
                    after_other: waits(&self, step, chunk, lay.chunks),
                    done: items_through(step, chunk, lay.chunks),
                }
            })
        })
    }
}

/// One rank's place in a broadcast from `root` in a ring of `n`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Broadcast {
    n: usize,
    /// Distance from the root along the ring: 0 at the root, N−1 at the root's predecessor.
    pub position: usize,
}

impl Broadcast {
    pub fn new(rank: usize, root: usize, n: usize) -> Self {
        debug_assert!(rank < n && root < n);
        Broadcast { n, position: (rank + n - root) % n }
    }

    /// The root: sends the buffer, receives nothing but the closing op header.
    pub fn is_root(&self) -> bool {
        self.position == 0
    }

    /// Whether this rank receives the buffer (everyone but the root).
    pub fn receives(&self) -> bool {
        self.position > 0
    }

    /// Whether this rank sends the buffer on (everyone but the root's predecessor).
    pub fn forwards(&self) -> bool {
        self.position < self.n - 1
    }

    /// The chunking of the buffer for pipelining: one segment, chunks of at most
    /// `chunk_elems` elements.
    pub fn layout(len: usize, chunk_elems: usize) -> Layout {
        Layout::new(1, len, chunk_elems)
    }

    /// What this rank sends on, chunk by chunk (nothing at the root's predecessor). A
    /// non-root rank forwards chunk c only once it has received it.
    pub fn send_items(self, lay: Layout) -> impl Iterator<Item = Item> {
        let chunks = if self.forwards() { lay.chunks } else { 0 };
        (0..chunks).map(move |chunk| Item {
            after_other: self.receives().then(|| items_through(0, chunk, lay.chunks)),
            ..Self::item(lay, chunk)
        })
    }

    /// What this rank receives, chunk by chunk (nothing at the root).
    pub fn recv_items(self, lay: Layout) -> impl Iterator<Item = Item> {
        let chunks = if self.receives() { lay.chunks } else { 0 };
        (0..chunks).map(move |chunk| Self::item(lay, chunk))
    }

    fn item(lay: Layout, chunk: usize) -> Item {
        let (start, len) = lay.chunk(0, chunk);
        Item {
            step: 0,
            chunk,
            start,
            len,
            reduces: false,
            completes: false,
            after_other: None,
            done: items_through(0, chunk, lay.chunks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const WORLDS: std::ops::RangeInclusive<usize> = 1..=5;

    #[test]
    fn split_covers_range_exactly() {
        for len in [0usize, 1, 2, 7, 100, 1001] {
            for parts in WORLDS {
                let mut next = 0;
                for i in 0..parts {
                    let (o, l) = split(len, parts, i);
                    assert_eq!(o, next);
                    // Near-equal: lengths differ by at most one, longer ones first.
                    assert!(l == len / parts || l == len / parts + 1);
                    assert_eq!(l, len / parts + usize::from(i < len % parts));
                    next = o + l;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn segment_boundaries_when_length_does_not_divide() {
        let seg = |n, len| (0..n).map(|s| Layout::new(n, len, usize::MAX).seg(s)).collect::<Vec<_>>();
        assert_eq!(seg(3, 10), [(0, 4), (4, 3), (7, 3)]);
        assert_eq!(seg(4, 10), [(0, 3), (3, 3), (6, 2), (8, 2)]);
        assert_eq!(seg(5, 3), [(0, 1), (1, 1), (2, 1), (3, 0), (3, 0)]);
        assert_eq!(seg(2, 1), [(0, 1), (1, 0)]);
        assert_eq!(seg(1, 7), [(0, 7)]);
        assert_eq!(seg(4, 0), [(0, 0); 4]);
    }

    #[test]
    fn chunks_tile_each_segment_and_respect_the_chunk_size() {
        for (n, len, chunk) in [(3, 1_000_003, 4096), (4, 10, 3), (5, 3, 1), (2, 0, 8), (1, 17, 4), (5, 1001, 7)] {
            let lay = Layout::new(n, len, chunk);
            let mut covered = 0;
            for seg in 0..n {
                let (s0, sl) = lay.seg(seg);
                assert_eq!(s0, covered);
                for c in 0..lay.chunks {
                    let (o, l) = lay.chunk(seg, c);
                    assert_eq!(o, covered, "n={n} len={len} seg={seg} chunk={c}");
                    assert!(l <= chunk);
                    covered += l;
                }
                assert_eq!(covered, s0 + sl);
            }
            assert_eq!(covered, len);
        }
        // Fewest chunks that keep each under the limit: the largest segment of 1,000,003
        // floats over 3 ranks is 333,335 floats, 82 chunks of ≤ 4096.
        assert_eq!(Layout::new(3, 1_000_003, 4096).chunks, 82);
        assert_eq!(Layout::new(2, 0, 4096).chunks, 1);
    }

    #[test]
    fn every_rank_sends_and_receives_these_segments() {
        // Written out for N = 3: rows are steps, entries (send, recv) for ranks 0, 1, 2.
        let expect =
            [[(0, 2), (1, 0), (2, 1)], [(2, 1), (0, 2), (1, 0)], [(1, 0), (2, 1), (0, 2)], [(0, 2), (1, 0), (2, 1)]];
        for (step, row) in expect.iter().enumerate() {
            for (rank, &(send, recv)) in row.iter().enumerate() {
                let s = AllReduce::new(rank, 3);
                assert_eq!((s.send_segment(step), s.recv_segment(step)), (send, recv), "rank {rank} step {step}");
            }
        }
        for n in WORLDS {
            assert_eq!(AllReduce::new(0, n).steps(), 2 * (n - 1));
            for rank in 0..n {
                let (me, next) = (AllReduce::new(rank, n), AllReduce::new((rank + 1) % n, n));
                for step in 0..me.steps() {
                    // Both ends of a link agree on what is on the wire.
                    assert_eq!(me.send_segment(step), next.recv_segment(step), "n={n} rank {rank} step {step}");
                    // What we forward is what we just received.
                    if step >= 1 {
                        assert_eq!(me.send_segment(step), me.recv_segment(step - 1));
                    }
                    assert_eq!(me.reduces(step), step < n - 1);
                }
            }
        }
    }

    /// Runs the schedule on sets of contributing ranks instead of numbers: at the end every
    /// rank must hold every segment summed over all ranks exactly once.
    #[test]
    fn the_schedule_sums_every_segment_over_every_rank() {
        for n in WORLDS {
            // held[rank][seg]: the ranks whose data is summed into that segment (a multiset
            // would catch double counting too; a Vec that must end sorted and unique does).
            let mut held: Vec<Vec<Vec<usize>>> = (0..n).map(|r| vec![vec![r]; n]).collect();
            let steps = AllReduce::new(0, n).steps();
            for step in 0..steps {
                let sent: Vec<(usize, Vec<usize>)> = (0..n)
                    .map(|r| {
                        let seg = AllReduce::new(r, n).send_segment(step);
                        (seg, held[r][seg].clone())
                    })
                    .collect();
                for r in 0..n {
                    let me = AllReduce::new(r, n);
                    let (seg, data) = &sent[(r + n - 1) % n];
                    assert_eq!(*seg, me.recv_segment(step));
                    if me.reduces(step) {
                        held[r][*seg].extend(data);
                    } else {
                        held[r][*seg] = data.clone();
                    }
                }
            }
            let all: Vec<usize> = (0..n).collect();
            for (r, segs) in held.iter_mut().enumerate() {
                for (seg, contrib) in segs.iter_mut().enumerate() {
                    contrib.sort_unstable();
                    assert_eq!(*contrib, all, "n={n} rank {r} segment {seg}");
                }
            }
        }
    }

    /// A compressed op rounds a segment where `completes` says so; that must be the one
    /// point where the rank holds the segment's full sum, and the rank must then forward
    /// exactly that segment and never receive into it again, so the value it keeps is the
    /// value every other rank receives.
    #[test]
    fn a_segment_completes_once_on_its_owner_and_is_forwarded_from_there() {
        for n in 2..=5 {
            for rank in 0..n {
                let s = AllReduce::new(rank, n);
                let completing: Vec<usize> = (0..s.steps()).filter(|&t| s.completes(t)).collect();
                assert_eq!(completing, [n - 2], "n={n}");
                let owned = s.recv_segment(n - 2);
                assert!(s.reduces(n - 2));
                assert_eq!(s.send_segment(n - 1), owned, "the first all-gather step forwards it");
                assert!((n - 1..s.steps()).all(|t| s.recv_segment(t) != owned), "n={n} rank {rank}");
                assert_eq!(owned, (rank + 1) % n);
            }
        }
    }

    #[test]
    fn pipelining_waits_cover_exactly_the_shared_memory() {
        for n in WORLDS {
            for rank in 0..n {
                let s = AllReduce::new(rank, n);
                let chunks = 3;
                for step in 0..s.steps() {
                    for c in 0..chunks {
                        // The receive item the sender waits for wrote the very chunk it sends.
                        match s.send_waits_for_received(step, c, chunks) {
                            None => assert_eq!(step, 0),
                            Some(k) => {
                                let (rs, rc) = ((k - 1) / chunks, (k - 1) % chunks);
                                assert_eq!((s.recv_segment(rs), rc), (s.send_segment(step), c));
                                assert_eq!(rs + 1, step);
                            }
                        }
                        // The send item the receiver waits for read the very chunk it overwrites,
                        // and it is the latest send of that chunk before this step.
                        match s.recv_waits_for_sent(step, c, chunks) {
                            None => {
                                assert!(step + 1 < n);
                                assert!((0..=step).all(|t| s.send_segment(t) != s.recv_segment(step)));
                            }
                            Some(k) => {
                                let (ss, sc) = ((k - 1) / chunks, (k - 1) % chunks);
                                assert_eq!((s.send_segment(ss), sc), (s.recv_segment(step), c));
                                assert!((ss + 1..=step).all(|t| s.send_segment(t) != s.recv_segment(step)));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn items_walk_the_schedule_in_order() {
        for n in WORLDS {
            for rank in 0..n {
                let s = AllReduce::new(rank, n);
                let lay = Layout::new(n, 1001, 100);
                let (sent, recvd): (Vec<Item>, Vec<Item>) = (s.send_items(lay).collect(), s.recv_items(lay).collect());
                assert_eq!(sent.len(), s.steps() * lay.chunks);
                assert_eq!(recvd.len(), sent.len());
                for (k, (o, i)) in sent.iter().zip(&recvd).enumerate() {
                    let (step, c) = (k / lay.chunks, k % lay.chunks);
                    assert_eq!((o.step, o.chunk, i.step, i.chunk), (step, c, step, c));
                    assert_eq!((o.start, o.len), lay.chunk(s.send_segment(step), c));
                    assert_eq!((i.start, i.len), lay.chunk(s.recv_segment(step), c));
                    assert_eq!(i.reduces, s.reduces(step));
                    assert_eq!(i.completes, step + 2 == n);
                    assert_eq!(o.after_other, s.send_waits_for_received(step, c, lay.chunks));
                    assert_eq!(i.after_other, s.recv_waits_for_sent(step, c, lay.chunks));
                    // Progress counts every item once, in order.
                    assert_eq!((o.done, i.done), (k + 1, k + 1));
                }
            }
        }
        // Inline ops use one chunk per segment: one item per step, the whole segment.
        let s = AllReduce::new(1, 3);
        let lay = Layout::new(3, 10, usize::MAX);
        let recv: Vec<(usize, usize, bool)> = s.recv_items(lay).map(|i| (i.start, i.len, i.reduces)).collect();
        assert_eq!(recv, [(0, 4, true), (7, 3, true), (4, 3, false), (0, 4, false)]);
    }

    #[test]
    fn broadcast_items_send_only_what_arrived() {
        let lay = Broadcast::layout(1000, 256);
        for n in 2..=5 {
            for rank in 0..n {
                let b = Broadcast::new(rank, 1 % n, n);
                let (sent, recvd): (Vec<Item>, Vec<Item>) = (b.send_items(lay).collect(), b.recv_items(lay).collect());
                assert_eq!(sent.len(), if b.forwards() { lay.chunks } else { 0 }, "n={n} rank {rank}");
                assert_eq!(recvd.len(), if b.receives() { lay.chunks } else { 0 });
                for (c, it) in sent.iter().enumerate() {
                    assert_eq!((it.start, it.len), lay.chunk(0, c));
                    // The root sends at once; the others forward chunk c once it is in.
                    assert_eq!(it.after_other, b.receives().then_some(c + 1));
                }
                for (c, it) in recvd.iter().enumerate() {
                    assert_eq!(
                        (it.start, it.len, it.reduces, it.after_other, it.done),
                        (lay.chunk(0, c).0, lay.chunk(0, c).1, false, None, c + 1)
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_positions_form_a_chain_from_the_root() {
        for n in WORLDS {
            for root in 0..n {
                let pos: Vec<Broadcast> = (0..n).map(|r| Broadcast::new(r, root, n)).collect();
                assert!(pos[root].is_root() && !pos[root].receives());
                let distinct: BTreeSet<usize> = pos.iter().map(|b| b.position).collect();
                assert_eq!(distinct, (0..n).collect());
                for r in 0..n {
                    // Each rank sits one further along than its predecessor, except the root.
                    let prev = (r + n - 1) % n;
                    if r != root {
                        assert_eq!(pos[r].position, pos[prev].position + 1, "n={n} root={root} rank {r}");
                        assert!(pos[r].receives());
                        assert!(pos[prev].forwards(), "rank {prev} must pass the buffer to {r}");
                    }
                    assert_eq!(pos[r].forwards(), (r + 1) % n != root);
                }
            }
        }
        let b = |rank, root| Broadcast::new(rank, root, 4).position;
        assert_eq!([b(0, 2), b(1, 2), b(2, 2), b(3, 2)], [2, 3, 0, 1]);
        // World size 1: the root neither receives nor forwards.
        let solo = Broadcast::new(0, 0, 1);
        assert!(solo.is_root() && !solo.receives() && !solo.forwards());
    }

    #[test]
    fn broadcast_chunks_tile_the_buffer() {
        for (len, chunk) in [(0usize, 256usize), (1, 256), (1000, 256), (1024, 256), (65_537, 65_536)] {
            let lay = Broadcast::layout(len, chunk);
            assert_eq!(lay.chunks, len.div_ceil(chunk).max(1));
            let mut covered = 0;
            for c in 0..lay.chunks {
                let (o, l) = lay.chunk(0, c);
                assert_eq!(o, covered);
                assert!(l <= chunk);
                covered += l;
            }
            assert_eq!(covered, len);
        }
    }
}
