//! TLS and exposure checks against a real `cvdist coordinator` process. The CA, the
//! server certificate and the client certificates are generated at test time (rcgen).
//!
//! Clients present a certificate for mutual TLS through `CVDIST_TLS_CLIENT_CERT` and
//! `CVDIST_TLS_CLIENT_KEY` (common/src/client.rs), so the real `cvdist` CLI and a real
//! `cvdist-worker` are used for every case.

mod cluster;

use cluster::{cvdist_bin, free_port, wait_port, worker_bin, ChildGuard, TOKEN, WORKER_TOKEN};
use cvdist_common::client::connect;
use cvdist_common::proto::ListJobsRequest;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Certificates written to a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("cvdist test CA");
        let rogue = new_ca("someone else's CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        leaf(&ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, dir.path(), "server");
        leaf(&ca, &[], ExtendedKeyUsagePurpose::ClientAuth, dir.path(), "client");
        leaf(&rogue, &[], ExtendedKeyUsagePurpose::ClientAuth, dir.path(), "rogue");
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    dir: &Path,
    file: &str,
) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, file);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
}

struct Coord {
    state: tempfile::TempDir,
    port: u16,
    metrics: u16,
    _child: ChildGuard,
    workers: Vec<ChildGuard>,
}

impl Coord {
    fn start(pki: &Pki, mutual: bool) -> Coord {
        let state = tempfile::tempdir().unwrap();
        let (port, metrics) = (free_port(), free_port());
        let mut cmd = Command::new(cvdist_bin());
        cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--tls-cert")
            .arg(pki.path("server.pem"))
            .arg("--tls-key")
            .arg(pki.path("server.key"))
            .env("CVDIST_TOKEN", TOKEN)
            .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.path().join("coordinator.log")).unwrap());
        if mutual {
            cmd.arg("--tls-client-ca").arg(pki.path("ca.pem"));
        }
        let child = cmd.spawn().unwrap();
        wait_port(port);
        wait_port(metrics);
        Coord { state, port, metrics, _child: ChildGuard(child), workers: Vec::new() }
    }

    fn workers(&self) -> f64 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines().find_map(|l| l.strip_prefix("cvdist_workers ")).unwrap().trim().parse().unwrap()
    }
}

/// `cvdist jobs` against `url`; `identity` names the client certificate files, if any.
fn jobs(url: &str, ca: Option<&Path>, identity: Option<(&Path, &Path)>, token: &str) -> Output {
    let mut cmd = Command::new(cvdist_bin());
    cmd.args(["jobs", "--coordinator", url])
        .env("CVDIST_TOKEN", token)
        .env("RUST_BACKTRACE", "1")
        .env_remove("CVDIST_TLS_CA")
        .env_remove("CVDIST_TLS_CLIENT_CERT")
        .env_remove("CVDIST_TLS_CLIENT_KEY");
    if let Some(ca) = ca {
        cmd.arg("--tls-ca").arg(ca);
    }
    if let Some((cert, key)) = identity {
        cmd.env("CVDIST_TLS_CLIENT_CERT", cert).env("CVDIST_TLS_CLIENT_KEY", key);
    }
    cmd.output().unwrap()
}

fn assert_ok(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("JOB "), "{stdout}");
}

/// Refused: exit status 2 and one `error: …` line that starts with `prefix`.
fn assert_refused(out: &Output, prefix: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with(prefix), "expected {prefix:?}…, got {stderr}");
    stderr.trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_ca_succeeds_and_plain_http_fails() {
    let pki = Pki::new();
    let c = Coord::start(&pki, false);
    let https = format!("https://127.0.0.1:{}", c.port);
    let ca = pki.path("ca.pem");

    let mut client = connect(&https, Some(TOKEN), Some(&ca)).await.expect("https with the CA");
    client.list_jobs(ListJobsRequest {}).await.expect("ListJobs over TLS");
    assert_ok(&jobs(&https, Some(&ca), None, TOKEN));
    assert_ok(&jobs(&format!("https://localhost:{}", c.port), Some(&ca), None, TOKEN));

    // Plain HTTP/2 to the TLS port, and TLS without trusting the CA, are both refused.
    let plain = jobs(&format!("http://127.0.0.1:{}", c.port), None, None, TOKEN);
    let text = assert_refused(&plain, "error: ");
    // Observed: "error: operation was canceled: transport error: connection closed".
    assert!(text.contains("transport error"), "{text}");
    let untrusted = jobs(&https, None, None, TOKEN);
    let text = assert_refused(&untrusted, &format!("error: cannot reach the coordinator at {https}: transport error"));
    assert!(text.contains("invalid peer certificate: UnknownIssuer"), "{text}");
    eprintln!("untrusted CA: {text}");
    // The token is still required over TLS.
    assert_refused(&jobs(&https, Some(&ca), None, "wrong"), "error: wrong token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let mut c = Coord::start(&pki, true);
    let https = format!("https://127.0.0.1:{}", c.port);
    let ca = pki.path("ca.pem");
    let client = (pki.path("client.pem"), pki.path("client.key"));
    let rogue = (pki.path("rogue.pem"), pki.path("rogue.key"));

    // TLS 1.3 refuses the client certificate after the client considers the handshake
    // done, so the client sees the connection close: "error: operation was canceled:
    // transport error: connection closed".
    let none = assert_refused(&jobs(&https, Some(&ca), None, TOKEN), "error: ");
    assert!(none.contains("transport error"), "{none}");
    let wrong_ca = assert_refused(&jobs(&https, Some(&ca), Some((&rogue.0, &rogue.1)), TOKEN), "error: ");
    assert!(wrong_ca.contains("transport error"), "{wrong_ca}");
    assert_ok(&jobs(&https, Some(&ca), Some((&client.0, &client.1)), TOKEN));
    // mTLS does not replace the token.
    assert_refused(&jobs(&https, Some(&ca), Some((&client.0, &client.1)), "wrong"), "error: wrong token");
    // A half-configured identity is a clear local error.
    let mut half = Command::new(cvdist_bin());
    half.args(["jobs", "--coordinator", &https, "--tls-ca"]).arg(&ca).env("CVDIST_TOKEN", TOKEN);
    let out = half.env("CVDIST_TLS_CLIENT_CERT", &client.0).env_remove("CVDIST_TLS_CLIENT_KEY").output().unwrap();
    assert_refused(
        &out,
        "error: set both CVDIST_TLS_CLIENT_CERT and CVDIST_TLS_CLIENT_KEY for a client certificate, or neither",
    );

    // A real worker joins over mutual TLS with the same variables.
    let worker = Command::new(worker_bin())
        .args(["worker", "--coordinator", &https, "--data-listen", "127.0.0.1:0", "--device", "cpu", "--threads", "1"])
        .args(["--worker-id", "tls-w0"])
        .arg("--tls-ca")
        .arg(&ca)
        .arg("--cache-dir")
        .arg(c.state.path().join("cache"))
        .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
        .env("CVDIST_TLS_CLIENT_CERT", &client.0)
        .env("CVDIST_TLS_CLIENT_KEY", &client.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(c.state.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    c.workers.push(ChildGuard(worker));
    let start = Instant::now();
    while c.workers() != 1.0 {
        let log = std::fs::read_to_string(c.state.path().join("worker.log")).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(30), "worker did not register over mTLS:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn non_loopback_listen_without_a_token_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let run = |listen: &str, extra: &[&str]| {
        Command::new(cvdist_bin())
            .args(["coordinator", "--listen", listen])
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .args(extra)
            .env_remove("CVDIST_TOKEN")
            .env_remove("CVDIST_TOKEN_FILE")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    // Refused before anything is bound (0.0.0.0 never opens a socket here).
    for listen in ["0.0.0.0:50999", "192.0.2.1:50999", "[::]:50999"] {
        let out = run(listen, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let last = stderr.lines().last().unwrap_or("");
        let shown = listen.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(
            last,
            format!(
                "error: refusing to listen on {shown} without a token: set CVDIST_TOKEN or --token-file, or pass --allow-insecure-remote if the network is trusted"
            ),
            "{stderr}"
        );
    }
    // --allow-insecure-remote lets the check pass. 192.0.2.1 (TEST-NET-1) is not an
    // address of this machine, so the next step, binding, fails: proof the exposure check
    // was passed without opening a socket on a real interface.
    let out = run("192.0.2.1:50999", &["--allow-insecure-remote"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no token configured: any local process can control this coordinator"), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        "error: binding 192.0.2.1:50999: Cannot assign requested address (os error 99)",
        "{stderr}"
    );
    // And on loopback no token is needed at all.
    let port = free_port();
    let mut child = Command::new(cvdist_bin())
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .env_remove("CVDIST_TOKEN")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn missing_or_garbage_tls_files_refuse_to_start() {
    let pki = Pki::new();
    let state = tempfile::tempdir().unwrap();
    let garbage = state.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n").unwrap();
    let missing = state.path().join("missing.pem");
    let run = |cert: &Path, key: &Path| {
        let port = free_port();
        let mut child = Command::new(cvdist_bin())
            .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .env("CVDIST_TOKEN", TOKEN)
            .env("CVDIST_WORKER_TOKEN", WORKER_TOKEN)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // It must exit by itself; a coordinator that starts anyway is a failure.
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("coordinator started with bad TLS files {cert:?} {key:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    let out = run(&missing, &pki.path("server.key"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        format!("error: reading TLS certificate {}: No such file or directory (os error 2)", missing.display())
    );
    let out = run(&garbage, &pki.path("server.key"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        "error: configuring TLS: transport error: invalid peer certificate: BadEncoding"
    );
    let out = run(&pki.path("server.pem"), &pki.path("client.key"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        "error: configuring TLS: transport error: keys may not be consistent: KeyMismatch"
    );
}
