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
                f(rank, ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}
