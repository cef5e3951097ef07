//! Bearer-token authentication for gRPC calls.
//!
//! Two credentials with two roles: the *client token* (`CVDIST_TOKEN`, `--token-file`)
//! lets users and the submit Job manage jobs; the *worker credential*
//! (`CVDIST_WORKER_TOKEN`, `--worker-token-file`) lets a process register as a worker,
//! move checkpoints and fetch the dataset. Neither admits the other role, so holding the
//! CLI token does not make anyone a member of a training group. docs/RELIABILITY.md
//! ("Threat model") describes who holds which.

use std::path::Path;
use subtle::ConstantTimeEq;

/// gRPC metadata key carrying the token.
pub const TOKEN_METADATA_KEY: &str = "authorization";
/// Environment variable read by every binary when no token file is given.
pub const TOKEN_ENV: &str = "CVDIST_TOKEN";
/// Environment variable holding the worker credential when no worker token file is given.
pub const WORKER_TOKEN_ENV: &str = "CVDIST_WORKER_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("token file {path} is empty")]
    Empty { path: String },
}

/// Loads the token from `file` if given, else from `$CVDIST_TOKEN`; `None` when neither is set.
pub fn load_token(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenError::Read { path: path.display().to_string(), source })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(TokenError::Empty { path: path.display().to_string() });
        }
        return Ok(Some(token));
    }
    Ok(env_token(TOKEN_ENV))
}

/// Loads the worker credential from `file` if given, else from `$CVDIST_WORKER_TOKEN`.
pub fn load_worker_token(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    if file.is_some() {
        return load_token(file);
    }
    Ok(env_token(WORKER_TOKEN_ENV))
}

fn env_token(var: &str) -> Option<String> {
    std::env::var(var).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Compares two secrets in time that depends only on their lengths, so a peer cannot
/// learn a prefix of the token from response timing (`subtle`'s `ct_eq`, which also
/// keeps the compiler from turning the comparison into an early-exit loop).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The value sent in the `authorization` metadata entry.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_equal_and_unequal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load_token(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(load_token(Some(&empty)).unwrap_err().to_string().contains("empty"));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "abc\n").unwrap();
        assert_eq!(load_token(Some(&ok)).unwrap().as_deref(), Some("abc"));
    }
}
