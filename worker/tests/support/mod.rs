//! Shared by the worker's integration tests: real rings of threads over loopback sockets.
#![allow(dead_code)]

use cvdist_worker::collective::Ring;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// `n` listeners on free loopback ports and their addresses, by rank.
pub fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    (ls, addrs)
}

/// Runs `f(rank, ring)` on `n` threads after connecting them into a ring authenticated with
/// `secret` (each operation bounded by `timeout`); returns the results by rank.
pub fn with_ring<R: Send + 'static>(
    n: usize,
    secret: &'static str,
    timeout: Duration,
    f: impl Fn(usize, Ring) -> R + Send + Sync + 'static,
) -> Vec<R> {
    ring_ranks(n, secret, timeout, move |rank, ring, _| f(rank, ring))
}

/// `f(rank, ring, addresses)` on `n` threads joined by a loopback ring; results by rank.
pub fn ring_ranks<R: Send + 'static>(
    n: usize,
    secret: &'static str,
    timeout: Duration,
    f: impl Fn(usize, Ring, &[String]) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let (ls, addrs) = listeners(n);
    let f = Arc::new(f);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f) = (addrs.clone(), f.clone());
            thread::spawn(move || {
                let ring = Ring::connect(rank, n, &addrs, l, secret, timeout)
                    .unwrap_or_else(|e| panic!("rank {rank} connect: {e}"));
                f(rank, ring, &addrs)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

/// `f(rank, ring, addresses)` on `n` scoped threads (so `f` may borrow the caller's data),
/// each with one libtorch thread, joined by a loopback ring authenticated with "secret"
/// (each operation bounded by `timeout`); results by rank.
pub fn scoped_ranks<R: Send>(n: usize, timeout: Duration, f: impl Fn(usize, Ring, &[String]) -> R + Sync) -> Vec<R> {
    let (ls, addrs) = listeners(n);
    thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, f) = (&addrs, &f);
                s.spawn(move || {
                    tch::set_num_threads(1);
                    let ring = Ring::connect(rank, n, addrs, l, "secret", timeout)
                        .unwrap_or_else(|e| panic!("rank {rank} connect: {e}"));
                    f(rank, ring, addrs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

/// [`scoped_ranks`] over a communicator of kind `kind`: `f(rank, comm)`; results by rank.
pub fn with_comm_scoped<R: Send>(
    kind: Comm,
    n: usize,
    timeout: Duration,
    f: impl Fn(usize, Box<dyn cvdist_worker::collective::Collective>) -> R + Sync,
) -> Vec<R> {
    scoped_ranks(n, timeout, |rank, ring, addrs| f(rank, into_comm(kind, ring, addrs, "secret", timeout)))
}

/// [`with_comm_scoped`] on the ring, or on [`cvdist_worker::collective::Solo`] in this
/// thread when `n` is 1 (a ring needs two ranks).
pub fn with_comm_scoped_or_solo<R: Send>(
    n: usize,
    f: impl Fn(usize, &mut dyn cvdist_worker::collective::Collective) -> R + Sync,
) -> Vec<R> {
    if n == 1 {
        return vec![f(0, &mut cvdist_worker::collective::Solo::new())];
    }
    with_comm_scoped(Comm::Ring, n, Duration::from_secs(60), |rank, mut comm| f(rank, comm.as_mut()))
}

/// Which communicator a multi-rank test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comm {
    /// cvdist's TCP ring.
    Ring,
    /// PyTorch's c10d `ProcessGroupGloo`, rendezvoused over the ring as jobs do.
    Gloo,
}

pub const COMMS: [Comm; 2] = [Comm::Ring, Comm::Gloo];

/// Runs `f(rank, comm)` on `n` threads over a communicator of kind `kind` (each op bounded
/// by `timeout`); returns the results by rank.
pub fn with_comm<R: Send + 'static>(
    kind: Comm,
    n: usize,
    secret: &'static str,
    timeout: Duration,
    f: impl Fn(usize, Box<dyn cvdist_worker::collective::Collective>) -> R + Send + Sync + 'static,
) -> Vec<R> {
    ring_ranks(n, secret, timeout, move |rank, ring, addrs| f(rank, into_comm(kind, ring, addrs, secret, timeout)))
}

/// The c10d gloo group agreed over `ring` (as a job agrees on it).
pub fn gloo_group(
    ring: Ring,
    addrs: &[String],
    secret: &str,
    timeout: Duration,
) -> cvdist_worker::collective::c10d::ProcessGroup {
    use cvdist_worker::collective::backend::{self, Addresses, Chosen, SystemGroup};
    let rank = cvdist_worker::collective::Collective::rank(&ring);
    let group = SystemGroup::for_choice("gloo", tch::Device::Cpu);
    let addrs = Addresses { peers: addrs, secret };
    match backend::choose(ring, "gloo", timeout, &addrs, group.as_ref()) {
        Ok(Chosen::Group(g)) => g,
        Ok(Chosen::Ring { .. }) => panic!("rank {rank}: gloo fell back to the ring"),
        Err(e) => panic!("rank {rank}: gloo group: {e}"),
    }
}

/// `ring` itself, or the c10d group of `kind` agreed over it as a job agrees on it.
pub fn into_comm(
    kind: Comm,
    ring: Ring,
    addrs: &[String],
    secret: &str,
    timeout: Duration,
) -> Box<dyn cvdist_worker::collective::Collective> {
    match kind {
        Comm::Ring => Box::new(ring),
        Comm::Gloo => Box::new(gloo_group(ring, addrs, secret, timeout)),
    }
}

/// The methods every `Collective` must define, delegated to `self.$inner`: for test wrappers
/// that intercept only some of the others (use it inside their `impl Collective` block).
#[allow(unused_macros)]
macro_rules! delegate_required_collective {
    ($inner:ident) => {
        fn rank(&self) -> usize {
            self.$inner.rank()
        }
        fn world_size(&self) -> usize {
            self.$inner.world_size()
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), cvdist_worker::collective::CollectiveError> {
            self.$inner.all_reduce_sum(buf)
        }
        fn broadcast(
            &mut self,
            buf: &mut [f32],
            root: usize,
        ) -> Result<(), cvdist_worker::collective::CollectiveError> {
            self.$inner.broadcast(buf, root)
        }
        fn barrier(&mut self) -> Result<(), cvdist_worker::collective::CollectiveError> {
            self.$inner.barrier()
        }
        fn abort_handle(&self) -> cvdist_worker::collective::AbortHandle {
            self.$inner.abort_handle()
        }
    };
}
#[allow(unused_imports)]
pub(crate) use delegate_required_collective;
