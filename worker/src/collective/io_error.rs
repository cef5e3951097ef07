//! Reads and writes on a connected ring link, with `std::io` errors turned into the
//! [`CollectiveError`] a caller can act on: a timeout names the op and the silent peer, a
//! closed connection names the peer, and after an abort every error becomes the abort's
//! reason (shutting the sockets down is how an abort interrupts a blocked read, so the
//! resulting I/O error is a symptom, not the cause).

use super::{AbortHandle, CollectiveError};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Which op and peer an I/O error belongs to, to build the error variant.
#[derive(Clone, Copy)]
pub(super) struct IoCtx<'a> {
    pub op: &'static str,
    pub peer: usize,
    /// The socket timeout in force, reported in [`CollectiveError::Timeout`].
    pub timeout: Duration,
    pub abort: &'a AbortHandle,
}

impl IoCtx<'_> {
    /// `what` completes "{op} {what} rank {peer}" in errors that are neither a timeout nor
    /// a closed connection, e.g. "receiving from".
    pub fn map(&self, e: std::io::Error, what: &str) -> CollectiveError {
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

    /// The error for a read or write that returned 0 bytes: the peer closed the link.
    pub fn closed(&self) -> CollectiveError {
        if self.abort.is_aborted() {
            self.abort.error()
        } else {
            CollectiveError::PeerClosed { peer: self.peer }
        }
    }

    pub fn read_full(&self, s: &mut TcpStream, mut buf: &mut [u8]) -> Result<(), CollectiveError> {
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

    pub fn read_full_arr<const N: usize>(&self, s: &mut TcpStream) -> Result<[u8; N], CollectiveError> {
        let mut b = [0u8; N];
        self.read_full(s, &mut b)?;
        Ok(b)
    }

    /// Writes `first` then `second` with as few syscalls as possible (a small header
    /// rides in the same segment as the first chunk).
    pub fn write_full(&self, s: &mut TcpStream, mut first: &[u8], mut second: &[u8]) -> Result<(), CollectiveError> {
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

/// The error for a thread that stopped waiting because the op failed or was aborted:
/// the abort's reason, or a placeholder that the executor discards in favour of the
/// other thread's real error.
pub(super) fn failure_or_abort(abort: &AbortHandle) -> CollectiveError {
    if abort.is_aborted() {
        abort.error()
    } else {
        CollectiveError::Broken("peer thread failed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(abort: &AbortHandle) -> IoCtx<'_> {
        IoCtx { op: "all_reduce", peer: 3, timeout: Duration::from_secs(2), abort }
    }

    #[test]
    fn io_errors_map_to_what_the_caller_can_act_on() {
        let abort = AbortHandle::new();
        let c = ctx(&abort);
        let e = |k: ErrorKind| std::io::Error::new(k, "x");
        match c.map(e(ErrorKind::WouldBlock), "receiving from") {
            CollectiveError::Timeout { op, peer, secs } => assert_eq!((op, peer, secs), ("all_reduce", 3, 2.0)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.map(e(ErrorKind::TimedOut), "x"), CollectiveError::Timeout { .. }));
        for k in [
            ErrorKind::UnexpectedEof,
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
            ErrorKind::BrokenPipe,
            ErrorKind::NotConnected,
        ] {
            assert!(matches!(c.map(e(k), "x"), CollectiveError::PeerClosed { peer: 3 }), "{k:?}");
        }
        assert_eq!(c.map(e(ErrorKind::PermissionDenied), "sending to").to_string(), "all_reduce sending to rank 3: x");
        assert!(matches!(c.closed(), CollectiveError::PeerClosed { peer: 3 }));
        assert!(matches!(failure_or_abort(&abort), CollectiveError::Broken(_)));

        // After an abort every error is the abort's.
        abort.abort("job cancelled");
        for err in [c.map(e(ErrorKind::BrokenPipe), "x"), c.closed(), failure_or_abort(&abort)] {
            assert_eq!(err.to_string(), "collective aborted: job cancelled");
        }
    }
}
