//! Re-adopting a running attempt after the coordinator restarted: the
//! secret each attempt's ring handshake uses, derived so that a restarted coordinator knows
//! it again, and the proof a worker presents to claim its rank in that attempt.
//!
//! The coordinator keeps one random 32-byte key in its store. An attempt's secret is
//! `HMAC-SHA256(key, "cvdist attempt secret" ‖ job ‖ attempt)`, sent to the attempt's members
//! in `Assignment.session_secret`; nothing per attempt is stored. A worker that
//! re-registers with a `RejoinRequest` signs its claim with that secret, and only a member of
//! the attempt (which received the secret) can make a proof the coordinator accepts.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the coordinator's key for attempt secrets.
pub const KEY_BYTES: usize = 32;

/// Fields are joined with NUL, which no job id, worker id or number contains, so two
/// different claims never sign the same bytes.
fn mac(key: &[u8], label: &str, fields: &[&str]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(label.as_bytes());
    for f in fields {
        m.update(b"\0");
        m.update(f.as_bytes());
    }
    m
}

/// The secret of `attempt` of `job_id` (32 hex characters, as the random secrets before):
/// the ring handshake key of its members, and the key of their re-registration proofs.
pub fn attempt_secret(key: &[u8], job_id: &str, attempt: u32) -> String {
    let tag = mac(key, "cvdist attempt secret v1", &[job_id, &attempt.to_string()]).finalize().into_bytes();
    hex::encode(&tag[..16])
}

/// What a worker claims when it re-registers: which rank of which attempt it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub rank: u32,
    pub world_size: u32,
    pub worker_id: &'a str,
}

impl Claim<'_> {
    fn fields(&self) -> [String; 5] {
        [
            self.job_id.to_string(),
            self.attempt.to_string(),
            self.rank.to_string(),
            self.world_size.to_string(),
            self.worker_id.to_string(),
        ]
    }
}

/// The proof for `claim` under the attempt's `secret` (hex HMAC-SHA256).
pub fn proof(secret: &str, claim: &Claim<'_>) -> String {
    let fields = claim.fields();
    let refs: Vec<&str> = fields.iter().map(String::as_str).collect();
    hex::encode(mac(secret.as_bytes(), "cvdist rejoin v1", &refs).finalize().into_bytes())
}

/// Whether `presented` is the proof for `claim` under `secret` (constant time).
pub fn verify(secret: &str, claim: &Claim<'_>, presented: &str) -> bool {
    crate::auth::constant_time_eq(proof(secret, claim).as_bytes(), presented.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Claim<'static> {
        Claim { job_id: "j0001-resnet20", attempt: 2, rank: 1, world_size: 2, worker_id: "w1" }
    }

    #[test]
    fn attempt_secrets_depend_on_the_key_the_job_and_the_attempt() {
        let k = [7u8; KEY_BYTES];
        let s = attempt_secret(&k, "j0001-a", 0);
        assert_eq!(s.len(), 32);
        assert_eq!(s, attempt_secret(&k, "j0001-a", 0), "deterministic: a restarted coordinator derives it again");
        assert_ne!(s, attempt_secret(&k, "j0001-a", 1));
        assert_ne!(s, attempt_secret(&k, "j0002-a", 0));
        assert_ne!(s, attempt_secret(&[8u8; KEY_BYTES], "j0001-a", 0));
    }

    #[test]
    fn a_proof_verifies_only_for_its_own_claim_and_secret() {
        let p = proof("secret-a", &claim());
        assert!(verify("secret-a", &claim(), &p));
        assert!(!verify("secret-b", &claim(), &p), "another attempt's secret");
        for other in [
            Claim { rank: 0, ..claim() },
            Claim { attempt: 3, ..claim() },
            Claim { world_size: 3, ..claim() },
            Claim { worker_id: "w0", ..claim() },
            Claim { job_id: "j0002-resnet20", ..claim() },
        ] {
            assert!(!verify("secret-a", &other, &p), "{other:?}");
        }
        assert!(!verify("secret-a", &claim(), ""));
    }
}
