//! Moving one chunk of values over a link: counted writes, and the 16-bit rounding of a
//! compressed op (`compress.rs`) on the way out and widening on the way in.

use crate::collective::compress::Wire;
use crate::collective::io_error::IoCtx;
use crate::collective::CollectiveError;
use bytemuck::{cast_slice, cast_slice_mut};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};

/// What this rank has put on the link to `next` since the ring connected; both threads
/// of a pipelined op add to it.
#[derive(Default)]
pub(super) struct LinkStats {
    /// Bytes written to the link to `next` (op headers and payload; the handshake before
    /// is not counted).
    bytes_sent: AtomicU64,
    /// Finite values that a 16-bit rounding on this rank turned into ±inf.
    overflows: AtomicU64,
}

impl LinkStats {
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    fn overflowed(&self, n: usize) {
        if n > 0 {
            self.overflows.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// One chunk's worth of working memory: f32 values to sum, and the 16-bit words a
/// compressed op reads or writes. Both hold `chunk_elems` values.
pub(super) struct Scratch {
    values: Vec<f32>,
    pub words: Vec<u16>,
}

impl Scratch {
    pub fn new(elems: usize) -> Scratch {
        Scratch { values: vec![0.0; elems], words: vec![0; elems] }
    }
}

/// `dst += src`, element by element (a loop the compiler vectorises).
#[inline]
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Writes `first` then `second` and counts the bytes as sent.
pub(super) fn write_counted(
    tx: &IoCtx<'_>,
    stream: &mut TcpStream,
    first: &[u8],
    second: &[u8],
    stats: &LinkStats,
) -> Result<(), CollectiveError> {
    tx.write_full(stream, first, second)?;
    stats.bytes_sent.fetch_add((first.len() + second.len()) as u64, Ordering::Relaxed);
    Ok(())
}

/// Sends `first` (an op header, or nothing) followed by the values `src` in `wire`'s
/// format. f32 goes out as it is; 16-bit formats are rounded into `words` piece by piece
/// (the first piece carries `first`), counting overflows. `words` must not be empty.
pub(super) fn send_values(
    tx: &IoCtx<'_>,
    stream: &mut TcpStream,
    first: &[u8],
    src: &[f32],
    wire: Wire,
    words: &mut [u16],
    stats: &LinkStats,
) -> Result<(), CollectiveError> {
    if wire == Wire::F32 {
        return write_counted(tx, stream, first, cast_slice(src), stats);
    }
    let mut first = first;
    for piece in src.chunks(words.len()) {
        let w = &mut words[..piece.len()];
        stats.overflowed(wire.encode(piece, w));
        write_counted(tx, stream, first, cast_slice(w), stats)?;
        first = &[];
    }
    if !first.is_empty() {
        write_counted(tx, stream, first, &[], stats)?;
    }
    Ok(())
}

/// Receives the values for `dst` in `wire`'s format: added to `dst` when `reduces`,
/// written over it otherwise. When `completes` (the sum of `dst` is final after this
/// add) a 16-bit op rounds `dst` to what it will forward, so the owner holds the same
/// value as every rank it sends it to. `scratch` may be smaller than `dst`.
#[allow(clippy::too_many_arguments)]
pub(super) fn recv_values(
    rx: &IoCtx<'_>,
    stream: &mut TcpStream,
    dst: &mut [f32],
    reduces: bool,
    completes: bool,
    wire: Wire,
    scratch: &mut Scratch,
    stats: &LinkStats,
) -> Result<(), CollectiveError> {
    if wire == Wire::F32 {
        if !reduces {
            return rx.read_full(stream, cast_slice_mut(dst));
        }
        // A segment can exceed the scratch when chunk_bytes was set very small.
        for piece in dst.chunks_mut(scratch.values.len()) {
            let tmp = &mut scratch.values[..piece.len()];
            rx.read_full(stream, cast_slice_mut(tmp))?;
            add_into(piece, tmp);
        }
        return Ok(());
    }
    for piece in dst.chunks_mut(scratch.words.len()) {
        let w = &mut scratch.words[..piece.len()];
        rx.read_full(stream, cast_slice_mut(w))?;
        if !reduces {
            wire.decode(w, piece);
            continue;
        }
        let tmp = &mut scratch.values[..piece.len()];
        wire.decode_add(w, piece, tmp);
        if completes {
            stats.overflowed(wire.round(piece, w));
        }
    }
    Ok(())
}
