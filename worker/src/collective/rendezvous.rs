//! The key-value store a c10d process group rendezvous through ([`StoreServer`] on rank 0,
//! one [`StoreClient`] per rank), authenticated with the attempt's data-plane secret.
//!
//! c10d's own `TCPStore` accepts any client, lists its keys and lets anyone overwrite
//! them: a stranger on the network could join, stall or poison a group's rendezvous (the
//! NCCL unique id, gloo's peer addresses). Here every connection first proves it holds the
//! secret, in both directions (HMAC-SHA256 over fresh nonces from both sides), before any
//! key is read or written, so a stranger learns nothing and changes nothing; and the
//! server handles each connection on its own thread with a bounded handshake, so slow
//! strangers cannot hold members up (at most [`MAX_PENDING`] handshakes at once,
//! [`MAX_PENDING_PER_SOURCE`] from one address, each ended after [`HANDSHAKE_DEADLINE`]).
//!
//! Wire format, after the handshake: a request is `op: u8, key_len: u32, key, arg`, where
//! `arg` is `value_len: u32, value` for `SET`, `timeout_ms: u64` for `GET` (the server
//! waits for the key up to that long), `delta: i64` for `ADD`, and nothing otherwise. A
//! reply is `status: u8` (0 ok, 1 timed out, 2 refused), `len: u32`, payload. All integers
//! little-endian.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: [u8; 8] = *b"CVDSTOR1";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Longest key accepted, in bytes (c10d's keys are short names with a prefix).
pub const MAX_KEY: usize = 4096;
/// Largest value accepted, in bytes (gloo stores one rank's peer addresses: ~100 bytes per
/// rank; NCCL's unique id is 128 bytes).
pub const MAX_VALUE: usize = 4 << 20;
/// Most keys the store holds; c10d uses a few per rank.
pub const MAX_KEYS: usize = 1 << 16;
/// A connection gets this long for the whole handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);
/// Handshakes in progress at once; more connections are closed at once.
pub const MAX_PENDING: usize = 32;
/// Handshakes in progress from one source address.
pub const MAX_PENDING_PER_SOURCE: usize = 4;
/// How often idle server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

mod op {
    pub const SET: u8 = 1;
    pub const GET: u8 = 2;
    pub const ADD: u8 = 3;
    pub const CHECK: u8 = 4;
    pub const DELETE: u8 = 5;
    pub const NUM_KEYS: u8 = 6;
}

mod status {
    pub const OK: u8 = 0;
    pub const TIMEOUT: u8 = 1;
    pub const REFUSED: u8 = 2;
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rendezvous store: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rendezvous store at {0} did not prove it holds the attempt's secret")]
    ServerAuth(String),
    #[error("rendezvous store at {0} refused this rank (wrong attempt secret?)")]
    Refused(String),
    #[error("rendezvous store: key {0:?} not set within {1:?}")]
    Timeout(String, Duration),
    #[error("rendezvous store refused the request: {0}")]
    Request(String),
    #[error("rendezvous store: could not reach {addr} within {secs:.0}s: {last}")]
    Unreachable { addr: String, secs: f64, last: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn mac(secret: &[u8], label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(label);
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m
}

const SERVER_LABEL: &[u8] = b"cvdist rendezvous store: server";
const CLIENT_LABEL: &[u8] = b"cvdist rendezvous store: client";

/// The keys and values, with a condition variable for `GET`s waiting on a key.
#[derive(Default)]
struct Table {
    map: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    changed: Condvar,
}

/// Rank 0's store: listens on an ephemeral port of the given address and serves
/// authenticated clients until dropped.
pub struct StoreServer {
    port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    /// Authentication failures seen (strangers, wrong secrets); for tests and logs.
    refused: Arc<AtomicUsize>,
}

impl StoreServer {
    /// Binds `ip:0` and starts serving. `secret` is the attempt's data-plane secret.
    ///
    /// Errors: the port cannot be bound or the thread cannot start.
    pub fn start(ip: IpAddr, secret: &[u8]) -> Result<StoreServer, StoreError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(io(format!("binding {ip}:0")))?;
        listener.set_nonblocking(true).map_err(io("non-blocking listener"))?;
        let port = listener.local_addr().map_err(io("listener address"))?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(ServerState {
            table: Table::default(),
            secret: secret.to_vec(),
            stop: stop.clone(),
            pending: Mutex::new(HashMap::new()),
            refused: refused.clone(),
        });
        let accept = thread::Builder::new()
            .name("cvdist-store".into())
            .spawn(move || accept_loop(listener, state))
            .map_err(io("starting the store thread"))?;
        Ok(StoreServer { port, stop, accept: Some(accept), refused })
    }

    /// The port clients connect to (on the address given to [`StoreServer::start`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections that failed the handshake so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct ServerState {
    table: Table,
    secret: Vec<u8>,
    stop: Arc<AtomicBool>,
    /// Handshakes in progress per source address.
    pending: Mutex<HashMap<IpAddr, usize>>,
    refused: Arc<AtomicUsize>,
}

fn accept_loop(listener: TcpListener, state: Arc<ServerState>) {
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let ip = peer.ip();
                {
                    let mut pending = lock(&state.pending);
                    let total: usize = pending.values().sum();
                    let from = pending.entry(ip).or_insert(0);
                    if total >= MAX_PENDING || *from >= MAX_PENDING_PER_SOURCE {
                        continue; // dropping the stream closes it
                    }
                    *from += 1;
                }
                let state = state.clone();
                let spawned = thread::Builder::new().name("cvdist-store-conn".into()).spawn({
                    let state = state.clone();
                    move || serve_connection(stream, ip, &state)
                });
                if spawned.is_err() {
                    release(&state, ip);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL / 5),
            Err(_) => thread::sleep(POLL / 5),
        }
    }
    // Wake every GET still waiting so its thread sees the stop flag.
    state.table.changed.notify_all();
}

fn release(state: &ServerState, ip: IpAddr) {
    let mut pending = lock(&state.pending);
    if let Some(n) = pending.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            pending.remove(&ip);
        }
    }
}

fn read_exact_until(s: &mut TcpStream, buf: &mut [u8], until: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The server's side of the handshake; true when the client proved it holds the secret.
fn server_handshake(s: &mut TcpStream, secret: &[u8]) -> std::io::Result<bool> {
    let until = Instant::now() + HANDSHAKE_DEADLINE;
    s.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
    let mut hello = [0u8; 8 + 4 + NONCE_LEN];
    read_exact_until(s, &mut hello, until)?;
    if hello[..8] != MAGIC {
        return Ok(false);
    }
    let rank = &hello[8..12];
    let nonce_c = &hello[12..];
    let mut nonce_s = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce_s);
    let proof = mac(secret, SERVER_LABEL, &[nonce_c, &nonce_s]).finalize().into_bytes();
    let mut reply = Vec::with_capacity(NONCE_LEN + MAC_LEN);
    reply.extend_from_slice(&nonce_s);
    reply.extend_from_slice(&proof);
    s.write_all(&reply)?;
    let mut tag = [0u8; MAC_LEN];
    read_exact_until(s, &mut tag, until)?;
    let ok = mac(secret, CLIENT_LABEL, &[nonce_c, &nonce_s, rank]).verify_slice(&tag).is_ok();
    s.write_all(&[if ok { status::OK } else { status::REFUSED }])?;
    Ok(ok)
}

fn serve_connection(mut s: TcpStream, ip: IpAddr, state: &ServerState) {
    let _ = s.set_nodelay(true);
    let authenticated = matches!(server_handshake(&mut s, &state.secret), Ok(true));
    release(state, ip);
    if !authenticated {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let _ = s.set_write_timeout(None);
    while !state.stop.load(Ordering::SeqCst) {
        match serve_request(&mut s, state) {
            Ok(true) => {}
            // The client left, broke the protocol, or the store stops.
            Ok(false) | Err(_) => return,
        }
    }
}

/// Reads `n` bytes, waking every [`POLL`] to look at the stop flag while the connection
/// is idle. Ok(None) when the store stops.
fn read_request_bytes(s: &mut TcpStream, n: usize, state: &ServerState) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    s.set_read_timeout(Some(POLL))?;
    while got < n {
        if state.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(buf))
}

fn reply(s: &mut TcpStream, code: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(code);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    s.write_all(&out)
}

/// One request; Ok(false) ends the connection.
fn serve_request(s: &mut TcpStream, state: &ServerState) -> std::io::Result<bool> {
    let Some(head) = read_request_bytes(s, 5, state)? else { return Ok(false) };
    let kind = head[0];
    let klen = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if klen > MAX_KEY {
        reply(s, status::REFUSED, format!("key of {klen} bytes (at most {MAX_KEY})").as_bytes())?;
        return Ok(false);
    }
    let Some(key) = read_request_bytes(s, klen, state)? else { return Ok(false) };
    let table = &state.table;
    match kind {
        op::SET => {
            let Some(len) = read_request_bytes(s, 4, state)? else { return Ok(false) };
            let vlen = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if vlen > MAX_VALUE {
                reply(s, status::REFUSED, format!("value of {vlen} bytes (at most {MAX_VALUE})").as_bytes())?;
                return Ok(false);
            }
            let Some(value) = read_request_bytes(s, vlen, state)? else { return Ok(false) };
            let mut map = lock(&table.map);
            if map.len() >= MAX_KEYS && !map.contains_key(&key) {
                drop(map);
                reply(s, status::REFUSED, format!("more than {MAX_KEYS} keys").as_bytes())?;
                return Ok(false);
            }
            map.insert(key, value);
            drop(map);
            table.changed.notify_all();
            reply(s, status::OK, &[])?;
        }
        op::GET => {
            let Some(t) = read_request_bytes(s, 8, state)? else { return Ok(false) };
            let timeout = Duration::from_millis(u64::from_le_bytes(t.try_into().unwrap_or([0; 8])));
            let until = Instant::now() + timeout;
            let mut map = lock(&table.map);
            let value = loop {
                if let Some(v) = map.get(&key) {
                    break Some(v.clone());
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() || state.stop.load(Ordering::SeqCst) {
                    break None;
                }
                map = table.changed.wait_timeout(map, left.min(POLL)).unwrap_or_else(|e| e.into_inner()).0;
            };
            drop(map);
            match value {
                Some(v) => reply(s, status::OK, &v)?,
                None => reply(s, status::TIMEOUT, &[])?,
            }
        }
        op::ADD => {
            let Some(d) = read_request_bytes(s, 8, state)? else { return Ok(false) };
            let delta = i64::from_le_bytes(d.try_into().unwrap_or([0; 8]));
            let mut map = lock(&table.map);
            // c10d's stores keep counters as decimal text.
            let now = map.get(&key).and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap_or(0);
            let next = now.wrapping_add(delta);
            if map.len() >= MAX_KEYS && !map.contains_key(&key) {
                drop(map);
                reply(s, status::REFUSED, format!("more than {MAX_KEYS} keys").as_bytes())?;
                return Ok(false);
            }
            map.insert(key, next.to_string().into_bytes());
            drop(map);
            table.changed.notify_all();
            reply(s, status::OK, &next.to_le_bytes())?;
        }
        op::CHECK => {
            let present = lock(&table.map).contains_key(&key);
            reply(s, status::OK, &[present as u8])?;
        }
        op::DELETE => {
            let removed = lock(&table.map).remove(&key).is_some();
            reply(s, status::OK, &[removed as u8])?;
        }
        op::NUM_KEYS => {
            let n = lock(&table.map).len() as i64;
            reply(s, status::OK, &n.to_le_bytes())?;
        }
        other => {
            reply(s, status::REFUSED, format!("unknown operation {other}").as_bytes())?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// One rank's authenticated connection to the [`StoreServer`]. Operations are serialised
/// (c10d calls a store from its own threads too).
pub struct StoreClient {
    stream: Mutex<TcpStream>,
    addr: String,
}

impl StoreClient {
    /// Connects to `addr` (`host:port`) as `rank`, retrying refused or unreachable
    /// connections until `timeout`, and runs the handshake; `stop` ends the retries early
    /// (the attempt's abort).
    ///
    /// Errors: [`StoreError::ServerAuth`] when the listener does not hold `secret` (never
    /// retried), [`StoreError::Refused`] when it rejected ours, [`StoreError::Unreachable`].
    pub fn connect(
        addr: &str,
        rank: u32,
        secret: &[u8],
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<StoreClient, StoreError> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if stop() {
                return Err(StoreError::Unreachable {
                    addr: addr.into(),
                    secs: timeout.as_secs_f64(),
                    last: "aborted".into(),
                });
            }
            match Self::try_connect(addr, rank, secret, deadline) {
                Ok(c) => return Ok(c),
                Err(e @ (StoreError::ServerAuth(_) | StoreError::Refused(_))) => return Err(e),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unreachable { addr: addr.into(), secs: timeout.as_secs_f64(), last });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_connect(addr: &str, rank: u32, secret: &[u8], deadline: Instant) -> Result<StoreClient, StoreError> {
        let target = addr
            .to_socket_addrs()
            .map_err(io(format!("resolving {addr}")))?
            .next()
            .ok_or_else(|| StoreError::Request(format!("{addr} resolves to no address")))?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let mut s = TcpStream::connect_timeout(&target, left.min(HANDSHAKE_DEADLINE))
            .map_err(io(format!("connecting to {addr}")))?;
        s.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        let until = Instant::now() + HANDSHAKE_DEADLINE;
        s.set_write_timeout(Some(HANDSHAKE_DEADLINE)).map_err(io("write timeout"))?;
        let mut nonce_c = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce_c);
        let rank_bytes = rank.to_le_bytes();
        let mut hello = Vec::with_capacity(8 + 4 + NONCE_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&rank_bytes);
        hello.extend_from_slice(&nonce_c);
        s.write_all(&hello).map_err(io("sending the store hello"))?;
        let mut answer = [0u8; NONCE_LEN + MAC_LEN];
        read_exact_until(&mut s, &mut answer, until).map_err(io("reading the store's answer"))?;
        let (nonce_s, proof) = answer.split_at(NONCE_LEN);
        if mac(secret, SERVER_LABEL, &[&nonce_c, nonce_s]).verify_slice(proof).is_err() {
            return Err(StoreError::ServerAuth(addr.into()));
        }
        let tag = mac(secret, CLIENT_LABEL, &[&nonce_c, nonce_s, &rank_bytes]).finalize().into_bytes();
        s.write_all(&tag).map_err(io("sending the store proof"))?;
        let mut verdict = [0u8; 1];
        read_exact_until(&mut s, &mut verdict, until).map_err(io("reading the store's verdict"))?;
        if verdict[0] != status::OK {
            return Err(StoreError::Refused(addr.into()));
        }
        s.set_write_timeout(None).map_err(io("write timeout"))?;
        Ok(StoreClient { stream: Mutex::new(s), addr: addr.into() })
    }

    /// Sends one request and reads its reply; `wait` bounds the reply's arrival.
    fn call(&self, kind: u8, key: &[u8], arg: &[u8], wait: Duration) -> Result<(u8, Vec<u8>), StoreError> {
        if key.len() > MAX_KEY {
            return Err(StoreError::Request(format!("key of {} bytes (at most {MAX_KEY})", key.len())));
        }
        let mut s = lock(&self.stream);
        let mut req = Vec::with_capacity(5 + key.len() + arg.len());
        req.push(kind);
        req.extend_from_slice(&(key.len() as u32).to_le_bytes());
        req.extend_from_slice(key);
        req.extend_from_slice(arg);
        s.write_all(&req).map_err(io(format!("writing to {}", self.addr)))?;
        let until = Instant::now() + wait + Duration::from_secs(10);
        let mut head = [0u8; 5];
        read_exact_until(&mut s, &mut head, until).map_err(io(format!("reading from {}", self.addr)))?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_VALUE {
            return Err(StoreError::Request(format!("reply of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        read_exact_until(&mut s, &mut payload, until).map_err(io(format!("reading from {}", self.addr)))?;
        if head[0] == status::REFUSED {
            return Err(StoreError::Request(String::from_utf8_lossy(&payload).into_owned()));
        }
        Ok((head[0], payload))
    }

    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if value.len() > MAX_VALUE {
            return Err(StoreError::Request(format!("value of {} bytes (at most {MAX_VALUE})", value.len())));
        }
        let mut arg = Vec::with_capacity(4 + value.len());
        arg.extend_from_slice(&(value.len() as u32).to_le_bytes());
        arg.extend_from_slice(value);
        self.call(op::SET, key, &arg, Duration::ZERO).map(|_| ())
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it.
    pub fn get(&self, key: &[u8], timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.call(op::GET, key, &ms.to_le_bytes(), timeout)? {
            (status::OK, v) => Ok(v),
            _ => Err(StoreError::Timeout(String::from_utf8_lossy(key).into_owned(), timeout)),
        }
    }

    /// Adds `delta` to the counter `key` (0 when unset); returns the new value.
    pub fn add(&self, key: &[u8], delta: i64) -> Result<i64, StoreError> {
        let (_, v) = self.call(op::ADD, key, &delta.to_le_bytes(), Duration::ZERO)?;
        Ok(i64::from_le_bytes(v.try_into().map_err(|_| StoreError::Request("malformed ADD reply".into()))?))
    }

    pub fn check(&self, key: &[u8]) -> Result<bool, StoreError> {
        let (_, v) = self.call(op::CHECK, key, &[], Duration::ZERO)?;
        Ok(v.first() == Some(&1))
    }

    pub fn delete(&self, key: &[u8]) -> Result<bool, StoreError> {
        let (_, v) = self.call(op::DELETE, key, &[], Duration::ZERO)?;
        Ok(v.first() == Some(&1))
    }

    pub fn num_keys(&self) -> Result<i64, StoreError> {
        let (_, v) = self.call(op::NUM_KEYS, &[], &[], Duration::ZERO)?;
        Ok(i64::from_le_bytes(v.try_into().map_err(|_| StoreError::Request("malformed NUM_KEYS reply".into()))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LOOP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn members_set_get_add_and_wait_for_each_other() {
        let server = StoreServer::start(LOOP, b"s3cret").unwrap();
        let addr = format!("127.0.0.1:{}", server.port());
        let a = StoreClient::connect(&addr, 0, b"s3cret", Duration::from_secs(5), &|| false).unwrap();
        let b = StoreClient::connect(&addr, 1, b"s3cret", Duration::from_secs(5), &|| false).unwrap();
        let waiter = thread::spawn(move || b.get(b"late", Duration::from_secs(5)).map(|v| (v, b)));
        thread::sleep(Duration::from_millis(100));
        a.set(b"late", b"value").unwrap();
        let (v, b) = waiter.join().unwrap().unwrap();
        assert_eq!(v, b"value");
        assert_eq!(a.add(b"n", 2).unwrap(), 2);
        assert_eq!(b.add(b"n", 3).unwrap(), 5);
        assert!(a.check(b"n").unwrap());
        assert_eq!(a.num_keys().unwrap(), 2);
        assert!(b.delete(b"n").unwrap());
        assert!(!a.check(b"n").unwrap());
        match a.get(b"never", Duration::from_millis(100)) {
            Err(StoreError::Timeout(k, _)) => assert_eq!(k, "never"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn a_wrong_secret_gets_nothing_and_a_fake_server_is_noticed() {
        let server = StoreServer::start(LOOP, b"right").unwrap();
        let addr = format!("127.0.0.1:{}", server.port());
        // A client with the wrong secret sees a server it cannot verify and stops.
        match StoreClient::connect(&addr, 0, b"wrong", Duration::from_secs(5), &|| false) {
            Err(StoreError::ServerAuth(_)) => {}
            Err(e) => panic!("expected ServerAuth, got {e}"),
            Ok(_) => panic!("a wrong secret connected"),
        }
        // A stranger who skips verifying the server still cannot get in.
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&0u32.to_le_bytes());
        hello.extend_from_slice(&[7u8; NONCE_LEN]);
        s.write_all(&hello).unwrap();
        let mut answer = [0u8; NONCE_LEN + MAC_LEN];
        s.read_exact(&mut answer).unwrap();
        s.write_all(&[0u8; MAC_LEN]).unwrap();
        let mut verdict = [0u8; 1];
        s.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict[0], status::REFUSED);
        // And nothing it sends afterwards reaches the table.
        let _ = s.write_all(&[op::SET, 1, 0, 0, 0, b'k', 1, 0, 0, 0, b'v']);
        let member = StoreClient::connect(&addr, 1, b"right", Duration::from_secs(5), &|| false).unwrap();
        assert!(!member.check(b"k").unwrap());
        assert!(server.refused() >= 2);
    }

    #[test]
    fn silent_strangers_do_not_hold_up_a_member() {
        let server = StoreServer::start(LOOP, b"k").unwrap();
        let addr = format!("127.0.0.1:{}", server.port());
        // More silent connections than one source may hold in handshakes.
        let strangers: Vec<TcpStream> =
            (0..3 * MAX_PENDING_PER_SOURCE).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
        let t = Instant::now();
        let member = StoreClient::connect(&addr, 0, b"k", Duration::from_secs(10), &|| false).unwrap();
        member.set(b"x", b"1").unwrap();
        assert!(t.elapsed() < HANDSHAKE_DEADLINE + Duration::from_secs(2), "took {:?}", t.elapsed());
        drop(strangers);
    }
}
