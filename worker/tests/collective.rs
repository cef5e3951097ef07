//! Ring collectives between threads on loopback, plus NCCL's "unavailable" path.

mod support;

use cvdist_worker::collective::wire::{self, Ack, Hello};
use cvdist_worker::collective::{all_reduce_buckets, Collective, CollectiveError, Ring};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::listeners;

const SECRET: &str = "job-attempt-secret";

/// Runs `f(rank, ring)` on `n` threads after connecting them; returns results by rank.
fn with_ring<R: Send + 'static>(
    n: usize,
    timeout: Duration,
    f: impl Fn(usize, Ring) -> R + Send + Sync + 'static,
) -> Vec<R> {
    support::with_ring(n, SECRET, timeout, f)
}

/// Integer-valued inputs keep every partial sum exact in f32, whatever the order.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (rank * 7 + i % 1000) as f32).collect()
}

fn expected(n: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (7 * n * (n - 1) / 2 + n * (i % 1000)) as f32).collect()
}

#[test]
fn all_reduce_is_exact_for_all_sizes_and_world_sizes() {
    // 1 float, odd, 4 KB, just above the inline threshold, and 1M+3 floats.
    let sizes = [1usize, 7, 1024, 5003, 1_000_003, 0];
    for n in [2usize, 3, 4] {
        let results = with_ring(n, Duration::from_secs(20), move |rank, mut ring| {
            assert_eq!((ring.rank(), ring.world_size()), (rank, n));
            for &len in &sizes {
                // Twice, to show that per-op state resets.
                for _ in 0..2 {
                    let mut buf = input(rank, len);
                    ring.all_reduce_sum(&mut buf).unwrap_or_else(|e| panic!("n={n} len={len} rank {rank}: {e}"));
                    if buf != expected(n, len) {
                        let bad = buf.iter().zip(expected(n, len)).position(|(a, b)| *a != b);
                        return Err(format!("n={n} len={len} rank {rank}: first mismatch at {bad:?}"));
                    }
                }
            }
            Ok(())
        });
        for r in results {
            r.unwrap();
        }
    }
}

#[test]
fn small_chunks_and_buckets_stay_exact() {
    let n = 3;
    let results = with_ring(n, Duration::from_secs(20), move |rank, mut ring| {
        // Many chunks per segment exercise the pipelining counters.
        ring.set_chunk_bytes(4096);
        let len = 200_001;
        let mut buf = input(rank, len);
        all_reduce_buckets(&mut ring, &mut buf, 65_536).unwrap();
        buf == expected(n, len)
    });
    assert!(results.into_iter().all(|ok| ok));
}

#[test]
fn broadcast_from_every_root() {
    for n in [2usize, 4] {
        let results = with_ring(n, Duration::from_secs(20), move |rank, mut ring| {
            for root in 0..n {
                for len in [1usize, 4097, 300_001] {
                    let mut buf: Vec<f32> =
                        if rank == root { (0..len).map(|i| (i * 3 + root) as f32).collect() } else { vec![-1.0; len] };
                    ring.broadcast(&mut buf, root).unwrap_or_else(|e| panic!("n={n} root={root} len={len}: {e}"));
                    assert!(
                        buf.iter().enumerate().all(|(i, &v)| v == (i * 3 + root) as f32),
                        "n={n} root={root} len={len} rank {rank} wrong data"
                    );
                }
            }
            let mut x = [0.0f32];
            assert!(matches!(ring.broadcast(&mut x, n), Err(CollectiveError::Config(_))));
        });
        assert_eq!(results.len(), n);
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    let n = 3;
    let entered: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let e2 = entered.clone();
    let exits = with_ring(n, Duration::from_secs(20), move |rank, mut ring| {
        thread::sleep(Duration::from_millis(100 * rank as u64));
        e2.lock().unwrap().push(Instant::now());
        ring.barrier().unwrap();
        Instant::now()
    });
    let last_entry = *entered.lock().unwrap().iter().max().unwrap();
    assert!(exits.iter().all(|&t| t >= last_entry));
}

#[test]
fn wrong_secret_is_rejected_quickly() {
    let (ls, addrs) = listeners(2);
    let start = Instant::now();
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            thread::spawn(move || {
                let secret = if rank == 0 { "right" } else { "wrong" };
                Ring::connect(rank, 2, &addrs, l, secret, Duration::from_secs(10)).map(|_| ())
            })
        })
        .collect();
    for h in handles {
        match h.join().unwrap() {
            Err(CollectiveError::Auth { .. }) => {}
            other => panic!("expected Auth error, got {other:?}"),
        }
    }
    assert!(start.elapsed() < Duration::from_secs(5), "auth failure should not wait for the timeout");
}

#[test]
fn garbage_and_impostors_do_not_stop_the_real_peers() {
    let (ls, addrs) = listeners(2);
    let spawn_rank = |rank: usize, l: TcpListener| {
        let addrs = addrs.clone();
        thread::spawn(move || {
            let mut ring = Ring::connect(rank, 2, &addrs, l, SECRET, Duration::from_secs(10))?;
            let mut buf = input(rank, 1000);
            ring.all_reduce_sum(&mut buf)?;
            Ok::<_, CollectiveError>(buf == expected(2, 1000))
        })
    };
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    // Rank 1 is accepting while the junk arrives; rank 0 only starts afterwards.
    let h1 = spawn_rank(1, l1);
    // Random bytes, a silent client that holds its connection open, and a client that
    // speaks the protocol but doesn't know the secret.
    let mut garbage = TcpStream::connect(&addrs[1]).unwrap();
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    garbage.write_all(&noise).unwrap();
    let _silent = TcpStream::connect(&addrs[1]).unwrap();
    let mut s = TcpStream::connect(&addrs[1]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Hello { version: wire::VERSION, world: 2, from: 0, to: 1, nonce: [9; wire::NONCE_LEN] };
    s.write_all(&hello.encode()).unwrap();
    let mut ack = [0u8; wire::ACK_LEN];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(Ack::decode(&ack).unwrap().status, wire::status::OK);
    s.write_all(&[0u8; wire::PROOF_LEN]).unwrap();
    let mut verdict = [0u8; 4];
    s.read_exact(&mut verdict).unwrap();
    assert_eq!(u32::from_le_bytes(verdict), wire::status::AUTH_FAILED);
    // The listener side must have dropped the garbage connection.
    garbage.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(garbage.read(&mut b), Ok(0) | Err(_)), "garbage connection left open");

    let h0 = spawn_rank(0, l0);
    assert!(h0.join().unwrap().unwrap());
    assert!(h1.join().unwrap().unwrap());
}

#[test]
fn wrong_world_size_is_a_clear_error() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let a = addrs.clone();
    // Rank 1 thinks the world has 3 ranks, so its peers list is padded.
    let h1 = thread::spawn(move || {
        let mut p = a.clone();
        p.push("127.0.0.1:1".into());
        Ring::connect(1, 3, &p, l1, SECRET, Duration::from_secs(3)).map(|_| ())
    });
    let r0 = Ring::connect(0, 2, &addrs, l0, SECRET, Duration::from_secs(3)).map(|_| ());
    let e0 = r0.unwrap_err().to_string();
    assert!(e0.contains("world"), "{e0}");
    assert!(h1.join().unwrap().is_err());
}

#[test]
fn a_dead_peer_becomes_an_error_not_a_hang() {
    let n = 3;
    let start = Instant::now();
    let results = with_ring(n, Duration::from_secs(30), move |rank, mut ring| {
        if rank == 2 {
            // Dies before the op: its sockets close while the others are mid-op.
            thread::sleep(Duration::from_millis(200));
            drop(ring);
            return None;
        }
        let mut buf = input(rank, 4_000_000);
        Some(ring.all_reduce_sum(&mut buf).map(|_| ()))
    });
    for r in results.into_iter().flatten() {
        assert!(r.is_err(), "survivors must see an error");
    }
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn a_hung_peer_times_out() {
    let n = 2;
    let release = Arc::new(Barrier::new(2));
    let r2 = release.clone();
    let results = with_ring(n, Duration::from_secs(20), move |rank, mut ring| {
        if rank == 1 {
            // Alive but never enters the op.
            r2.wait();
            return None;
        }
        ring.set_op_timeout(Duration::from_millis(500)).unwrap();
        let t = Instant::now();
        let mut buf = input(rank, 100_000);
        let r = ring.all_reduce_sum(&mut buf);
        let waited = t.elapsed();
        r2.wait();
        Some((r, waited))
    });
    let (r, waited) = results.into_iter().flatten().next().unwrap();
    assert!(matches!(r, Err(CollectiveError::Timeout { peer: 1, .. })), "{r:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn abort_unblocks_an_in_flight_op_and_later_ops() {
    let n = 2;
    let release = Arc::new(Barrier::new(2));
    let r2 = release.clone();
    let results = with_ring(n, Duration::from_secs(30), move |rank, mut ring| {
        if rank == 1 {
            r2.wait();
            return None;
        }
        let handle = ring.abort_handle();
        let aborter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            handle.abort("coordinator ended the attempt");
        });
        let t = Instant::now();
        let mut buf = input(rank, 2_000_000);
        let first = ring.all_reduce_sum(&mut buf);
        let waited = t.elapsed();
        let second = ring.barrier();
        aborter.join().unwrap();
        r2.wait();
        Some((first, second, waited))
    });
    let (first, second, waited) = results.into_iter().flatten().next().unwrap();
    match first {
        Err(CollectiveError::Aborted(r)) => assert!(r.contains("coordinator"), "{r}"),
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert!(matches!(second, Err(CollectiveError::Aborted(_))), "{second:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn mismatched_ops_are_protocol_errors() {
    let results = with_ring(2, Duration::from_secs(5), |rank, mut ring| {
        let mut buf = vec![1.0f32; 10 + rank];
        ring.all_reduce_sum(&mut buf)
    });
    assert!(
        results.iter().any(|r| matches!(r, Err(CollectiveError::Protocol(m)) if m.contains("disagree"))),
        "{results:?}"
    );
    assert!(results.iter().all(|r| r.is_err()));
}

#[test]
fn bad_arguments_are_config_errors() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = Ring::connect(0, 1, &["x".into()], l, SECRET, Duration::from_secs(1));
    assert!(matches!(r, Err(CollectiveError::Config(_))));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = Ring::connect(2, 2, &["a".into(), "b".into()], l, SECRET, Duration::from_secs(1));
    assert!(matches!(r, Err(CollectiveError::Config(_))));
}

#[test]
fn nccl_on_a_cpu_rank_is_a_clear_refusal_and_auto_means_the_ring() {
    use cvdist_worker::collective::backend::{GroupInit, SystemGroup};
    let nccl = SystemGroup::for_choice("nccl", tch::Device::Cpu).expect("nccl asks for a group");
    assert_eq!(nccl.local_problem().as_deref(), Some("NCCL needs a CUDA device; this rank trains on the CPU"));
    assert!(SystemGroup::for_choice("auto", tch::Device::Cpu).is_none(), "auto on a CPU is the ring");
    assert!(SystemGroup::for_choice("ring", tch::Device::Cuda(0)).is_none());
    let gloo = SystemGroup::for_choice("gloo", tch::Device::Cpu).expect("gloo asks for a group");
    assert_eq!(gloo.local_problem(), None);
    let on_gpu = SystemGroup::for_choice("auto", tch::Device::Cuda(1)).expect("auto on CUDA is NCCL");
    let built = cvdist_worker::collective::c10d::nccl_built();
    assert_eq!(on_gpu.local_problem().is_none(), built, "{:?}", on_gpu.local_problem());
}
