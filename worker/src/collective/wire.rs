//! Data-plane framing: the link handshake and the per-op header.
//!
//! Handshake (connector = rank r, acceptor = rank r+1):
//! 1. connector → `Hello`  { magic, version, world, from, to, nonce_c }
//! 2. acceptor  → `Ack`    { magic, version, world, rank, status, nonce_a, mac_a }
//! 3. connector → `Proof`  { mac_c }
//! 4. acceptor  → `Verdict`{ status }
//!
//! Both MACs are HMAC-SHA256 keyed with the job-attempt secret over both nonces and
//! both ranks, so each side proves it knows the secret without ever sending it, and a
//! recorded handshake cannot be replayed. Everything before the acceptor has checked
//! the magic is treated as untrusted: fixed sizes, no length fields to trust.
//!
//! The dialling, accepting and checking around these messages is in `link.rs`.
//!
//! After the handshake the stream carries, per op, a 32-byte [`OpHeader`] followed by
//! raw little-endian payload whose layout both sides derive from the header: f32 values,
//! or for the compressed gradient all-reduces ([`op::ALL_REDUCE_BF16`],
//! [`op::ALL_REDUCE_FP16`]) 16-bit words, two bytes per value (`compress.rs`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};

#[cfg(not(target_endian = "little"))]
compile_error!("the cvdist data plane sends f32 in native byte order and assumes little-endian hosts");

pub const MAGIC: [u8; 8] = *b"CVDRING\x01";
pub const VERSION: u32 = 1;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;

pub const HELLO_LEN: usize = 8 + 4 * 4 + NONCE_LEN;
pub const ACK_LEN: usize = 8 + 4 * 4 + NONCE_LEN + MAC_LEN;
pub const PROOF_LEN: usize = MAC_LEN;
pub const VERDICT_LEN: usize = 4;

type HmacSha256 = Hmac<Sha256>;

/// Acceptor's status codes in `Ack` and `Verdict`.
pub mod status {
    pub const OK: u32 = 0;
    pub const AUTH_FAILED: u32 = 1;
    pub const WRONG_RANK: u32 = 2;
    pub const WRONG_WORLD: u32 = 3;
    pub const BAD_VERSION: u32 = 4;

    pub fn describe(code: u32) -> &'static str {
        match code {
            OK => "ok",
            AUTH_FAILED => "authentication failed",
            WRONG_RANK => "unexpected rank",
            WRONG_WORLD => "world size mismatch",
            BAD_VERSION => "protocol version mismatch",
            _ => "unknown status",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub world: u32,
    pub from: u32,
    pub to: u32,
    pub nonce: [u8; NONCE_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub version: u32,
    pub world: u32,
    pub rank: u32,
    pub status: u32,
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
}

/// Decoding failure of an untrusted message; the caller turns it into an error that
/// names the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        put_u32s(&mut b[8..24], &[self.version, self.world, self.from, self.to]);
        b[24..].copy_from_slice(&self.nonce);
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, DecodeError> {
        if b[..8] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let [version, world, from, to] = get_u32s(&b[8..24]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[24..]);
        Ok(Hello { version, world, from, to, nonce })
    }
}

impl Ack {
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[..8].copy_from_slice(&MAGIC);
        put_u32s(&mut b[8..24], &[self.version, self.world, self.rank, self.status]);
        b[24..24 + NONCE_LEN].copy_from_slice(&self.nonce);
        b[24 + NONCE_LEN..].copy_from_slice(&self.mac);
        b
    }

    pub fn decode(b: &[u8; ACK_LEN]) -> Result<Self, DecodeError> {
        if b[..8] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let [version, world, rank, status] = get_u32s(&b[8..24]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[24..24 + NONCE_LEN]);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&b[24 + NONCE_LEN..]);
        Ok(Ack { version, world, rank, status, nonce, mac })
    }
}

fn put_u32s(dst: &mut [u8], vals: &[u32]) {
    for (d, v) in dst.chunks_exact_mut(4).zip(vals) {
        d.copy_from_slice(&v.to_le_bytes());
    }
}

fn get_u32s<const K: usize>(src: &[u8]) -> [u32; K] {
    let mut out = [0u32; K];
    for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
        *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    out
}

/// Which side of the link a MAC proves; distinct labels stop a peer from reflecting
/// the acceptor's MAC back as the connector's proof.
#[derive(Clone, Copy)]
pub enum Role {
    Acceptor,
    Connector,
}

/// What both MACs of one link's handshake bind: the world size, both ranks and both
/// nonces (fresh per handshake, so a recorded handshake cannot be replayed).
#[derive(Clone, Copy, Debug)]
pub struct LinkBinding<'a> {
    pub world: u32,
    pub connector: u32,
    pub acceptor: u32,
    pub nonce_c: &'a [u8; NONCE_LEN],
    pub nonce_a: &'a [u8; NONCE_LEN],
}

impl LinkBinding<'_> {
    /// The MAC the `role` side of the link sends.
    pub fn mac(&self, secret: &[u8], role: Role) -> [u8; MAC_LEN] {
        self.hmac(secret, role).finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC the `role` side must send, compared in constant time
    /// (`hmac`'s `verify_slice`), so a forger learns nothing from how long a rejection took.
    pub fn verify(&self, secret: &[u8], role: Role, tag: &[u8]) -> bool {
        self.hmac(secret, role).verify_slice(tag).is_ok()
    }

    /// HMAC-SHA256 keyed with the secret over: role label, [`MAGIC`], [`VERSION`], world,
    /// connector and acceptor rank (u32 little-endian each), connector nonce, acceptor nonce.
    fn hmac(&self, secret: &[u8], role: Role) -> HmacSha256 {
        let label: &[u8] = match role {
            Role::Acceptor => b"cvdist-ring acceptor",
            Role::Connector => b"cvdist-ring connector",
        };
        // HMAC takes keys of any length (longer ones are hashed first, RFC 2104), so this
        // cannot fail whatever secret the coordinator handed out.
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(label);
        mac.update(&MAGIC);
        for v in [VERSION, self.world, self.connector, self.acceptor] {
            mac.update(&v.to_le_bytes());
        }
        mac.update(self.nonce_c);
        mac.update(self.nonce_a);
        mac
    }
}

/// Op kinds in [`OpHeader::kind`].
pub mod op {
    use super::super::compress::Wire;

    pub const ALL_REDUCE: u32 = 1;
    pub const BROADCAST: u32 = 2;
    pub const BARRIER: u32 = 3;
    /// All-reduce whose values travel as bfloat16 (`--grad-compression bf16`); the
    /// header's `elems` still counts values, not bytes.
    pub const ALL_REDUCE_BF16: u32 = 4;
    /// All-reduce whose values travel as IEEE float16 (`--grad-compression fp16`).
    pub const ALL_REDUCE_FP16: u32 = 5;

    pub fn name(kind: u32) -> &'static str {
        match kind {
            ALL_REDUCE => "all_reduce",
            BROADCAST => "broadcast",
            BARRIER => "barrier",
            ALL_REDUCE_BF16 => "all_reduce_bf16",
            ALL_REDUCE_FP16 => "all_reduce_fp16",
            _ => "unknown op",
        }
    }

    /// The all-reduce kind whose values travel in `wire`.
    pub fn all_reduce(wire: Wire) -> u32 {
        match wire {
            Wire::F32 => ALL_REDUCE,
            Wire::Bf16 => ALL_REDUCE_BF16,
            Wire::Fp16 => ALL_REDUCE_FP16,
        }
    }

    /// The format of an op's values on the link.
    pub fn wire(kind: u32) -> Wire {
        match kind {
            ALL_REDUCE_BF16 => Wire::Bf16,
            ALL_REDUCE_FP16 => Wire::Fp16,
            _ => Wire::F32,
        }
    }
}

pub const OP_MAGIC: u32 = u32::from_le_bytes(*b"CVOP");
pub const OP_HEADER_LEN: usize = 32;

/// Sent once per op on every active link so that ranks issuing different ops (or the
/// same op on different lengths) fail loudly instead of summing misaligned bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    pub kind: u32,
    pub root: u32,
    pub seq: u64,
    pub elems: u64,
}

impl OpHeader {
    pub fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut b = [0u8; OP_HEADER_LEN];
        b[0..4].copy_from_slice(&OP_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.root.to_le_bytes());
        // 12..16 reserved (zero) keeps the u64 fields aligned for readability.
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.elems.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; OP_HEADER_LEN]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != OP_MAGIC {
            return None;
        }
        Some(OpHeader { kind: u32_at(4), root: u32_at(8), seq: u64_at(16), elems: u64_at(24) })
    }
}

/// Reads exactly `N` bytes into an array.
pub fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub fn write_all(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    w.write_all(b)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MACs are the wire format: these values were computed independently (Python's
    /// `hmac` module over the documented message layout) and must never change, or ranks
    /// of different builds stop recognising each other.
    #[test]
    fn link_macs_are_stable_and_verify() {
        let (nc, na) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let bind = LinkBinding { world: 3, connector: 1, acceptor: 2, nonce_c: &nc, nonce_a: &na };
        let (key, a, c) = (b"job-secret", Role::Acceptor, Role::Connector);
        let (mac_a, mac_c) = (bind.mac(key, a), bind.mac(key, c));
        assert_eq!(hex::encode(mac_a), "5c320f53d480e535446beac0a30f7ebeaa706c6dfc6d4d844b3799a2812682cd");
        assert_eq!(hex::encode(mac_c), "a95f5e1fdcd285f17d49d16294166df211ab4999bd53e1d291ba8b630003c79f");
        assert!(bind.verify(key, a, &mac_a));
        assert!(bind.verify(key, c, &mac_c));
        // Wrong role, secret, rank, nonce, a flipped bit, a truncated or empty tag: all refused.
        assert!(!bind.verify(key, c, &mac_a));
        assert!(!bind.verify(b"job-secreT", a, &mac_a));
        assert!(!LinkBinding { connector: 0, ..bind }.verify(key, a, &mac_a));
        assert!(!LinkBinding { nonce_c: &na, ..bind }.verify(key, a, &mac_a));
        let mut flipped = mac_a;
        flipped[31] ^= 1;
        assert!(!bind.verify(key, a, &flipped));
        assert!(!bind.verify(key, a, &mac_a[..16]));
        assert!(!bind.verify(key, a, &[]));
        // Secrets longer than SHA-256's 64-byte block are valid keys too.
        let long = [0xaau8; 131];
        assert!(bind.verify(&long, a, &bind.mac(&long, a)));
    }

    #[test]
    fn messages_round_trip_and_reject_bad_magic() {
        let h = Hello { version: VERSION, world: 4, from: 1, to: 2, nonce: [7; NONCE_LEN] };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let a = Ack { version: 1, world: 4, rank: 2, status: 0, nonce: [1; 32], mac: [2; 32] };
        assert_eq!(Ack::decode(&a.encode()).unwrap(), a);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert_eq!(Hello::decode(&bad), Err(DecodeError::BadMagic));
        let o = OpHeader { kind: op::BROADCAST, root: 3, seq: 99, elems: 1 << 40 };
        assert_eq!(OpHeader::decode(&o.encode()), Some(o));
        assert_eq!(OpHeader::decode(&[0u8; OP_HEADER_LEN]), None);
    }

    #[test]
    fn macs_differ_by_role_and_secret() {
        let (n1, n2) = ([1u8; 32], [2u8; 32]);
        let bind = LinkBinding { world: 2, connector: 0, acceptor: 1, nonce_c: &n1, nonce_a: &n2 };
        let a = bind.mac(b"s", Role::Acceptor);
        let c = bind.mac(b"s", Role::Connector);
        let a2 = bind.mac(b"t", Role::Acceptor);
        assert_ne!(a, c);
        assert_ne!(a, a2);
    }
}
