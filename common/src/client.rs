//! Connecting to the coordinator, shared by the CLI and the workers: the token goes into
//! every request, TLS is used for `https://` URLs, and message size limits match the server.

use crate::auth;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::version::MAX_MESSAGE_BYTES;
use std::path::Path;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

#[cfg(test)]
mod tests {
    #[test]
    fn warns_only_for_plaintext_to_remote_hosts() {
        let w = super::plaintext_token_warning;
        assert!(w("http://coordinator:50051", Some("t")).is_some());
        assert!(w("http://10.0.0.5:50051", Some("t")).is_some());
        assert!(w("http://127.0.0.1:50051", Some("t")).is_none());
        assert!(w("http://localhost:50051", Some("t")).is_none());
        assert!(w("http://[::1]:50051", Some("t")).is_none());
        assert!(w("https://coordinator:50051", Some("t")).is_none());
        assert!(w("http://coordinator:50051", None).is_none());
        assert!(w("http://exa mple:80", Some("t")).is_none());
    }
}

#[derive(Clone)]
pub struct TokenInterceptor {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert(auth::TOKEN_METADATA_KEY, v.clone());
        }
        Ok(req)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid coordinator URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read TLS CA {path}: {source}")]
    Ca { path: String, source: std::io::Error },
    #[error("cannot read the client certificate or key {path} (from ${var}): {source}")]
    ClientIdentity { path: String, var: &'static str, source: std::io::Error },
    #[error("set both CVDIST_TLS_CLIENT_CERT and CVDIST_TLS_CLIENT_KEY for a client certificate, or neither")]
    ClientIdentityHalf,
    #[error("token contains characters not allowed in a header")]
    Token,
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// Opens a channel to `url` (http:// or https://).
pub async fn connect(url: &str, token: Option<&str>, tls_ca: Option<&Path>) -> Result<Client, ConnectError> {
    let bad = |reason: String| ConnectError::Url { url: url.to_string(), reason };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("must start with http:// or https://".into()));
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = tls_ca {
            let pem =
                std::fs::read(ca).map_err(|source| ConnectError::Ca { path: ca.display().to_string(), source })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = client_identity()? {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ConnectError::Unreachable { url: url.to_string(), reason: error_chain(&e) })?;
    let value = match token {
        Some(t) => Some(auth::bearer(t).parse().map_err(|_| ConnectError::Token)?),
        None => None,
    };
    Ok(CoordinatorClient::with_interceptor(channel, TokenInterceptor { value })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A warning to show when `token` would travel to `url` in plaintext: an `http://` URL
/// whose host is not a loopback address (`localhost`, 127.0.0.0/8, ::1). Anyone on the
/// path could read the token and act with it; `None` when there is nothing to warn about.
pub fn plaintext_token_warning(url: &str, token: Option<&str>) -> Option<String> {
    token?;
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority),
    };
    // A malformed URL gets its own error from `connect`; no warning to add to it.
    if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')) {
        return None;
    }
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return None;
    }
    Some(format!(
        "sending the token to {} over plaintext http://: anyone on the network path can read and reuse it; use https:// (coordinator --tls-cert/--tls-key)",
        crate::text::printable(url)
    ))
}

/// Environment variables naming a PEM client certificate and key, presented to an
/// `https://` coordinator started with `--tls-client-ca` (mutual TLS). Both or neither.
pub const CLIENT_CERT_ENV: &str = "CVDIST_TLS_CLIENT_CERT";
pub const CLIENT_KEY_ENV: &str = "CVDIST_TLS_CLIENT_KEY";

/// A PEM certificate chain and its private key.
type PemIdentity = (Vec<u8>, Vec<u8>);

fn client_identity() -> Result<Option<PemIdentity>, ConnectError> {
    let read = |var: &'static str| -> Result<Option<Vec<u8>>, ConnectError> {
        match std::env::var_os(var).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(path) => std::fs::read(&path).map(Some).map_err(|source| ConnectError::ClientIdentity {
                path: Path::new(&path).display().to_string(),
                var,
                source,
            }),
        }
    };
    match (read(CLIENT_CERT_ENV)?, read(CLIENT_KEY_ENV)?) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        _ => Err(ConnectError::ClientIdentityHalf),
    }
}

/// "outer: inner: innermost", because transport errors hide the useful part in sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        src = s.source();
    }
    text
}
