//! Names and addresses that cross the wire and end up in file paths or dial targets: job
//! ids, worker ids, checkpoint names, data-plane addresses. One set of checks, used by the
//! coordinator on what workers and clients send and by workers on what the coordinator
//! sends (an assignment), so neither side relies on the other having checked.

use crate::text;

/// Longest data-plane address: a 253-character DNS name, ':' and a 5-digit port.
pub const MAX_ADDR_LEN: usize = 261;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NameError {
    #[error("{what} {shown} must be 1-64 characters from [A-Za-z0-9._-] and not start with '.'")]
    Name { what: &'static str, shown: String },
    #[error("checkpoint name {0} is not of the form ckpt-eEEEE-sSSSSSS")]
    Checkpoint(String),
    #[error("data address {0} is not HOST:PORT (a DNS name or IP address and a port 1-65535)")]
    Address(String),
}

/// A name safe to use as a file name: no separators, no traversal, no hidden files.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check(what: &'static str, name: &str) -> Result<(), NameError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(NameError::Name { what, shown: text::quoted(name) })
    }
}

/// A job id is a directory name on both the coordinator and the workers.
pub fn check_job_id(id: &str) -> Result<(), NameError> {
    check("job id", id)
}

/// A worker id names the worker in logs, job records and cache paths.
pub fn check_worker_id(id: &str) -> Result<(), NameError> {
    check("worker id", id)
}

/// The canonical checkpoint name for a position in training.
pub fn checkpoint_name(epoch: u32, step: u64) -> String {
    format!("ckpt-e{epoch:04}-s{step:06}")
}

/// Epoch and step of a checkpoint name; only names [`checkpoint_name`] produces are
/// accepted, so a name is also a safe file-name stem.
pub fn parse_checkpoint_name(name: &str) -> Result<(u32, u64), NameError> {
    let bad = || NameError::Checkpoint(text::quoted(name));
    let rest = name.strip_prefix("ckpt-e").ok_or_else(bad)?;
    let (e, s) = rest.split_once("-s").ok_or_else(bad)?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(e) || !digits(s) {
        return Err(bad());
    }
    let pos = (e.parse::<u32>().map_err(|_| bad())?, s.parse::<u64>().map_err(|_| bad())?);
    if checkpoint_name(pos.0, pos.1) != name {
        return Err(bad());
    }
    Ok(pos)
}

/// `HOST:PORT` where HOST is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn check_data_addr(addr: &str) -> Result<(), NameError> {
    let bad = || NameError::Address(text::quoted(addr));
    if addr.len() > MAX_ADDR_LEN {
        return Err(bad());
    }
    if addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['-', '.'])
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_traversal_and_odd_names() {
        for bad in ["../../victim_dir", "..", ".hidden", "a/b", "a\\b", "", "x\u{1b}[2K", &"a".repeat(65)] {
            assert!(check_job_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_job_id("j0001-resnet20").is_ok());
        let err = check_job_id("../../victim_dir").unwrap_err().to_string();
        assert!(err.contains("job id \"../../victim_dir\""), "{err}");
    }

    #[test]
    fn checkpoint_names_round_trip_and_nothing_else_parses() {
        assert_eq!(parse_checkpoint_name("ckpt-e0003-s000000"), Ok((3, 0)));
        assert_eq!(parse_checkpoint_name(&checkpoint_name(12345, 1234567)), Ok((12345, 1234567)));
        for bad in [
            "ckpt-e3-s0",
            "ckpt-e0003-s000000/../../x",
            "../ckpt-e0001-s000000",
            "ckpt-e+001-s000000",
            "ckpt-e0001-s00000a",
        ] {
            assert!(parse_checkpoint_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn data_addresses() {
        for ok in ["127.0.0.1:29500", "[::1]:29500", "w-0.cvdist-worker.ns.svc.cluster.local:29500"] {
            assert!(check_data_addr(ok).is_ok(), "{ok}");
        }
        for bad in
            ["nohost", ":80", "host:0", "host:99999", "a b:80", "host:80\u{1b}", &format!("{}:80", "a".repeat(300))]
        {
            assert!(check_data_addr(bad).is_err(), "{bad:?}");
        }
    }
}
