//! Link setup and authentication: how rank r gets its two TCP links, the one it sends on
//! (it dials rank r+1) and the one it receives on (it accepts rank r−1 on its listener).
//! The handshake's message formats and MACs are in [`super::wire`]; this module does the
//! dialling, accepting, retrying and the checks, and keeps hostile or confused clients on
//! the data-plane port from stalling setup (per-handshake deadline, bounded concurrent
//! handshakes overall and per source address).

use super::wire::{self, status, Ack, Hello, LinkBinding, Role};
use super::{lock, AbortHandle, CollectiveError};
use rand::RngCore;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

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

/// Both links of rank `rank` in a ring of `world`: `(send, recv)`, the authenticated
/// connection to `next` (dialled at `next_addr`) and the one accepted from `prev` on
/// `listener`. Gives up at `deadline`, or at once on an explicit rejection or an abort.
/// Arguments are assumed valid (checked by [`super::Ring::connect_with_abort`]).
pub(super) fn establish(
    rank: usize,
    world: usize,
    next_addr: &str,
    listener: TcpListener,
    secret: &str,
    deadline: Instant,
    abort: &AbortHandle,
) -> Result<(TcpStream, TcpStream), CollectiveError> {
    let next = (rank + 1) % world;
    let prev = (rank + world - 1) % world;
    let stop = Arc::new(SetupStop::default());

    let acceptor = {
        let (stop, abort, secret) = (stop.clone(), abort.clone(), secret.as_bytes().to_vec());
        let me = LinkSpec { rank, world, secret: Arc::new(secret) };
        thread::Builder::new()
            .name(format!("ring-accept-{rank}"))
            .spawn(move || accept_link(listener, me, prev, deadline, &stop, &abort))
            .map_err(|e| CollectiveError::io("spawning ring acceptor thread", e))?
    };
    let me = LinkSpec { rank, world, secret: Arc::new(secret.as_bytes().to_vec()) };
    let sent = connect_link(&me, next, next_addr, deadline, &stop, abort);
    if sent.is_err() {
        // The ring can't form; keep accepting only briefly, so that a predecessor
        // already trying to connect gets a definite answer (e.g. the same auth
        // failure) rather than "connection refused" until its timeout.
        *lock(&stop.linger_until) = Some(Instant::now() + SETUP_LINGER);
        stop.flag.store(true, Ordering::SeqCst);
    }
    let recv = acceptor.join().map_err(|_| CollectiveError::Protocol("ring acceptor thread panicked".into()))?;
    Ok((sent?, recv?))
}

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
    let bind = LinkBinding {
        world: me.world as u32,
        connector: me.rank as u32,
        acceptor: next as u32,
        nonce_c: &nonce_c,
        nonce_a: &ack.nonce,
    };
    if !bind.verify(&me.secret, Role::Acceptor, &ack.mac) {
        return Err(HandshakeFail::Fatal(CollectiveError::Auth { peer: next }));
    }
    let proof = bind.mac(&me.secret, Role::Connector);
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
    let bind = LinkBinding {
        world: me.world as u32,
        connector: prev as u32,
        acceptor: me.rank as u32,
        nonce_c: &hello.nonce,
        nonce_a: &nonce_a,
    };
    reply(&mut s, status::OK, bind.mac(&me.secret, Role::Acceptor)).map_err(|e| io("sending ack", e))?;
    let proof = read_array_by::<{ wire::PROOF_LEN }>(&mut s, until).map_err(|e| io("reading proof", e))?;
    if !bind.verify(&me.secret, Role::Connector, &proof) {
        let _ = wire::write_all(&mut s, &status::AUTH_FAILED.to_le_bytes());
        return Err((format!("rank {prev} failed authentication (wrong job secret)"), true));
    }
    wire::write_all(&mut s, &status::OK.to_le_bytes()).map_err(|e| io("sending verdict", e))?;
    Ok(s)
}
