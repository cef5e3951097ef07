//! Who may call what. Every request passes the token check ([`TokenCheck`]), which gives it a
//! [`Role`] from the credential it presents; every RPC then [`require`]s the role it serves:
//! job management the client token, worker sessions, checkpoints and the dataset the worker
//! credential. The two credentials are distinct secrets, so neither can act as the other.

use cvdist_common::auth;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Which credential a request presented; set by the token check, read by every RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Worker,
    /// No credentials are configured at all (loopback development): every RPC is open.
    Any,
}

/// Decides the role of a request from its `authorization` value.
fn role_for(given: &str, token: Option<&str>, worker_token: Option<&str>) -> Result<Role, Status> {
    if let Some(w) = worker_token {
        if auth::constant_time_eq(given.as_bytes(), auth::bearer(w).as_bytes()) {
            return Ok(Role::Worker);
        }
    }
    if let Some(t) = token {
        if auth::constant_time_eq(given.as_bytes(), auth::bearer(t).as_bytes()) {
            return Ok(Role::Client);
        }
    }
    match (given.is_empty(), token, worker_token) {
        (true, None, None) => Ok(Role::Any),
        // Only a worker credential configured: job management stays as open as with no credential.
        (true, None, Some(_)) => Ok(Role::Client),
        (true, Some(_), _) => {
            Err(Status::unauthenticated("this coordinator requires a token (CVDIST_TOKEN or --token-file)"))
        }
        (false, None, None) => Ok(Role::Any),
        (false, _, _) => Err(Status::unauthenticated("wrong token")),
    }
}

/// The gRPC interceptor that checks a request's token and records its [`Role`] in the
/// request's extensions.
#[derive(Clone)]
pub struct TokenCheck {
    /// The client token: users and the submit Job (job management RPCs only).
    token: Option<String>,
    /// The worker credential: registration, checkpoints, the dataset (worker RPCs only).
    worker_token: Option<String>,
}

impl TokenCheck {
    pub fn new(token: Option<String>, worker_token: Option<String>) -> TokenCheck {
        TokenCheck { token, worker_token }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let given = req.metadata().get(auth::TOKEN_METADATA_KEY).and_then(|v| v.to_str().ok()).unwrap_or("");
        let role = role_for(given, self.token.as_deref(), self.worker_token.as_deref())?;
        req.extensions_mut().insert(role);
        Ok(req)
    }
}

/// Refuses a request whose credential is for the other role.
pub fn require<T>(req: &Request<T>, want: Role) -> Result<(), Status> {
    match (req.extensions().get::<Role>(), want) {
        (Some(Role::Any), _) => Ok(()),
        (Some(have), want) if *have == want => Ok(()),
        (Some(Role::Client), Role::Worker) => Err(Status::permission_denied(
            "the client token cannot act as a worker: workers authenticate with the worker credential (CVDIST_WORKER_TOKEN or --worker-token-file)",
        )),
        (Some(_), _) => Err(Status::permission_denied(
            "the worker credential cannot manage jobs: use the client token (CVDIST_TOKEN or --token-file)",
        )),
        (None, _) => Err(Status::permission_denied("request carries no role (not authenticated by this server)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(given: &str, token: Option<&str>, worker: Option<&str>) -> Result<Role, tonic::Code> {
        let given = if given.is_empty() { String::new() } else { auth::bearer(given) };
        role_for(&given, token, worker).map_err(|s| s.code())
    }

    #[test]
    fn each_credential_gives_its_own_role_and_nothing_else_passes() {
        let (t, w) = (Some("client-secret"), Some("worker-secret"));
        assert_eq!(role("worker-secret", t, w), Ok(Role::Worker));
        assert_eq!(role("client-secret", t, w), Ok(Role::Client));
        assert_eq!(role("guess", t, w), Err(tonic::Code::Unauthenticated));
        assert_eq!(role("", t, w), Err(tonic::Code::Unauthenticated));
        // Only a worker credential: job management is as open as with none, workers are not.
        assert_eq!(role("", None, w), Ok(Role::Client));
        assert_eq!(role("guess", None, w), Err(tonic::Code::Unauthenticated));
        // No credential at all: everything is open, whatever the request carries.
        assert_eq!(role("", None, None), Ok(Role::Any));
        assert_eq!(role("anything", None, None), Ok(Role::Any));
    }

    #[test]
    fn a_request_needs_the_role_its_rpc_serves() {
        let with = |role: Option<Role>| {
            let mut req = Request::new(());
            if let Some(r) = role {
                req.extensions_mut().insert(r);
            }
            req
        };
        assert!(require(&with(Some(Role::Client)), Role::Client).is_ok());
        assert!(require(&with(Some(Role::Worker)), Role::Worker).is_ok());
        assert!(require(&with(Some(Role::Any)), Role::Worker).is_ok());
        for (have, want) in
            [(Some(Role::Client), Role::Worker), (Some(Role::Worker), Role::Client), (None, Role::Client)]
        {
            let err = require(&with(have), want).unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{have:?} for {want:?}");
        }
    }
}
