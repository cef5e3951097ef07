//! `--collective auto|gloo|nccl` agreement over a real loopback ring and the real
//! authenticated rendezvous store, with a fake group whose availability or creation fails
//! on one rank: every rank reaches the same verdict, `auto` keeps every rank on a ring that
//! still works and says why, `nccl`/`gloo` fail on every rank.

use cvdist_worker::collective::backend::{self, Addresses, BackendError, Chosen, GroupInit};
use cvdist_worker::collective::c10d::{GroupBackend, Rendezvous};
use cvdist_worker::collective::rendezvous::{StoreClient, StoreServer};
use cvdist_worker::collective::{AbortHandle, Collective, CollectiveError, Ring};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const SECRET: &str = "backend-test-secret";
const TIMEOUT: Duration = Duration::from_secs(20);

/// What goes wrong, and on which rank.
#[derive(Clone, Copy, Default)]
struct Faults {
    unusable_on: Option<usize>,
    init_fails_on: Option<usize>,
}

struct FakeGroup {
    rank: usize,
    faults: Faults,
    inits: Arc<AtomicUsize>,
    drops: Arc<AtomicUsize>,
}

/// Stands in for a working group; remembers what every rank wrote to the store.
struct FakeComm {
    rank: usize,
    world: usize,
    seen: Vec<Vec<u8>>,
    drops: Arc<AtomicUsize>,
    /// Rank 0 keeps the store serving for as long as its group lives, as a real one does.
    _server: Option<StoreServer>,
}

impl Drop for FakeComm {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

impl Collective for FakeComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new()
    }
}

impl GroupInit for FakeGroup {
    type Comm = FakeComm;
    fn backend(&self) -> GroupBackend {
        GroupBackend::Nccl { device: 0 }
    }
    fn local_problem(&self) -> Option<String> {
        (self.faults.unusable_on == Some(self.rank)).then(|| "no CUDA device visible".to_string())
    }
    fn init(
        &self,
        rank: usize,
        world: usize,
        rendezvous: &Rendezvous,
        timeout: Duration,
        _abort: &AbortHandle,
        server: Option<StoreServer>,
    ) -> Result<FakeComm, CollectiveError> {
        assert_eq!(timeout, TIMEOUT);
        self.inits.fetch_add(1, Ordering::SeqCst);
        if self.faults.init_fails_on == Some(rank) {
            return Err(CollectiveError::Protocol("unhandled cuda error".into()));
        }
        // A real rendezvous through rank 0's store, as c10d's would be.
        let store = StoreClient::connect(&rendezvous.store_addr, rank as u32, &rendezvous.secret, timeout, &|| false)
            .map_err(|e| CollectiveError::Protocol(e.to_string()))?;
        store.set(format!("rank{rank}").as_bytes(), format!("hello from {rank}").as_bytes()).unwrap();
        // Rank 0's entry and our own (a failing rank never writes; waiting for it would
        // only test the timeout).
        let seen = [0, rank].iter().map(|r| store.get(format!("rank{r}").as_bytes(), timeout).unwrap()).collect();
        Ok(FakeComm { rank, world, seen, drops: self.drops.clone(), _server: server })
    }
}

/// What one rank ended with: its backend (and reason), or the error; plus, on the ring,
/// the result of an all-reduce run afterwards to show the ring still works.
#[derive(Debug)]
enum Outcome {
    Group(Vec<Vec<u8>>),
    Ring { why: Option<String>, sum: Vec<f32> },
    Failed(String),
}

struct Run {
    outcomes: Vec<Outcome>,
    inits: usize,
    drops: usize,
}

fn run(world: usize, wanted: &'static str, faults: Faults) -> Run {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<String> = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let inits = Arc::new(AtomicUsize::new(0));
    let drops = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, inits, drops) = (addrs.clone(), inits.clone(), drops.clone());
            thread::spawn(move || {
                let ring = Ring::connect(rank, world, &addrs, l, SECRET, TIMEOUT).unwrap();
                let fake = FakeGroup { rank, faults, inits, drops };
                let addrs = Addresses { peers: &addrs, secret: SECRET };
                let group = (wanted != "ring").then_some(&fake);
                match backend::choose(ring, wanted, TIMEOUT, &addrs, group) {
                    Ok(Chosen::Group(comm)) => Outcome::Group(comm.seen.clone()),
                    Ok(Chosen::Ring { mut ring, why }) => {
                        let mut v = vec![rank as f32 + 1.0; 3];
                        ring.all_reduce_sum(&mut v).unwrap();
                        Outcome::Ring { why, sum: v }
                    }
                    Err(e) => Outcome::Failed(match &e {
                        BackendError::Unusable { .. } => format!("configuration: {e}"),
                        _ => format!("retry: {e}"),
                    }),
                }
            })
        })
        .collect();
    let outcomes = handles.into_iter().map(|h| h.join().unwrap()).collect();
    Run { outcomes, inits: inits.load(Ordering::SeqCst), drops: drops.load(Ordering::SeqCst) }
}

/// Sum of rank+1 over 3 ranks.
const RING_SUM: [f32; 3] = [6.0, 6.0, 6.0];

#[test]
fn every_rank_in_the_group_when_every_init_works() {
    let r = run(3, "auto", Faults::default());
    for (rank, o) in r.outcomes.iter().enumerate() {
        let want: Vec<Vec<u8>> = [0, rank].iter().map(|r| format!("hello from {r}").into_bytes()).collect();
        match o {
            Outcome::Group(seen) => assert_eq!(seen, &want, "every rank met rank 0 in its store"),
            other => panic!("expected the group, got {other:?}"),
        }
    }
    assert_eq!(r.inits, 3);
}

#[test]
fn auto_stays_on_the_ring_when_init_fails_on_one_rank() {
    let r = run(3, "auto", Faults { init_fails_on: Some(1), ..Faults::default() });
    for (rank, o) in r.outcomes.iter().enumerate() {
        match o {
            Outcome::Ring { why: Some(why), sum } => {
                assert!(why.contains("nccl on cuda:0 group init failed on rank(s) 1"), "rank {rank}: {why}");
                if rank == 1 {
                    assert!(why.contains("unhandled cuda error"), "the failing rank says what failed: {why}");
                }
                assert_eq!(sum, &RING_SUM, "rank {rank}: the ring still reduces");
            }
            other => panic!("rank {rank}: expected the ring with a reason, got {other:?}"),
        }
    }
    assert_eq!(r.inits, 3);
    assert_eq!(r.drops, 2, "the two communicators that were made are given up");
}

#[test]
fn nccl_fails_on_every_rank_when_init_fails_on_one() {
    let r = run(3, "nccl", Faults { init_fails_on: Some(2), ..Faults::default() });
    for (rank, o) in r.outcomes.iter().enumerate() {
        match o {
            Outcome::Failed(e) => {
                assert!(
                    e.starts_with("retry: process group init: nccl on cuda:0 group init failed on rank(s) 2"),
                    "rank {rank}: {e}"
                )
            }
            other => panic!("rank {rank}: expected an error, got {other:?}"),
        }
    }
    assert_eq!(r.drops, 2);
}

#[test]
fn a_rank_without_nccl_keeps_auto_on_the_ring_and_fails_nccl_as_configuration() {
    let faults = Faults { unusable_on: Some(2), ..Faults::default() };
    let r = run(3, "auto", faults);
    for (rank, o) in r.outcomes.iter().enumerate() {
        match o {
            Outcome::Ring { why: Some(why), sum } => {
                assert!(why.starts_with("nccl on cuda:0 unusable on rank(s) 2"), "rank {rank}: {why}");
                assert_eq!(rank == 2, why.contains("no CUDA device visible"), "rank {rank}: {why}");
                assert_eq!(sum, &RING_SUM);
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    assert_eq!(r.inits, 0, "nobody starts creating a communicator");
    let r = run(3, "nccl", faults);
    for (rank, o) in r.outcomes.iter().enumerate() {
        match o {
            Outcome::Failed(e) => {
                assert!(e.starts_with("configuration: --collective nccl requested but unusable"), "rank {rank}: {e}")
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

#[test]
fn ring_is_chosen_without_touching_a_group() {
    let r = run(2, "ring", Faults { unusable_on: Some(0), ..Faults::default() });
    for o in &r.outcomes {
        assert!(matches!(o, Outcome::Ring { why: None, .. }), "{o:?}");
    }
    assert_eq!(r.inits, 0);
}
