//! End-to-end tests of `download_cifar10` against a local HTTP server on 127.0.0.1 that
//! serves a small archive built here, with optional Range support and injected failures.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cvdist_common::cifar::{self, CifarSplit, BATCHES_DIR, TEST_FILE, TRAIN_FILES};
use cvdist_common::download::{download_cifar10, DownloadError, DownloadSpec};
use md5::{Digest, Md5};

const RECORDS_PER_FILE: usize = 4;

/// A gzip'd tar in the official layout with a few records per file; returns the archive
/// and the splits it holds.
fn make_archive() -> (Vec<u8>, CifarSplit, CifarSplit) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(BATCHES_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let mut train_images = Vec::new();
    let mut train_labels = Vec::new();
    for (k, name) in TRAIN_FILES.iter().enumerate() {
        let part = cifar::synthetic(RECORDS_PER_FILE, k as u64);
        cifar::write_split(&dir.join(name), &part).unwrap();
        for i in 0..part.len() {
            train_images.extend_from_slice(part.image(i));
            train_labels.push(part.label(i));
        }
    }
    let test = cifar::synthetic(RECORDS_PER_FILE, 100);
    cifar::write_split(&dir.join(TEST_FILE), &test).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), "airplane\nautomobile\n").unwrap();

    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(BATCHES_DIR, &dir).unwrap();
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    (bytes, CifarSplit::from_parts(train_images, train_labels).unwrap(), test)
}

fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

#[derive(Clone, Copy)]
struct Behaviour {
    ranges: bool,
    /// The first this-many GETs send about half of what they promise, then close.
    failures: usize,
}

struct Server {
    url: String,
    /// `Range` header of each request (None when absent), in order.
    ranges_seen: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(body: Vec<u8>, behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ranges_seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let served = AtomicUsize::new(0);
        let (seen, stop2) = (ranges_seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let n = served.fetch_add(1, Ordering::SeqCst);
                let _ = serve(conn, &body, behaviour, n < behaviour.failures, &seen);
            }
        });
        Server { url: format!("http://{addr}/cifar-10-binary.tar.gz"), ranges_seen, stop, addr, thread: Some(thread) }
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.ranges_seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut conn: TcpStream,
    body: &[u8],
    behaviour: Behaviour,
    fail: bool,
    seen: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut range = None;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Ok(()); // the wake-up connection from Drop
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    seen.lock().unwrap().push(range.clone());
    let start = match (&range, behaviour.ranges) {
        (Some(r), true) => r.trim_start_matches("bytes=").trim_end_matches('-').parse::<usize>().unwrap(),
        _ => 0,
    };
    if start >= body.len() && start > 0 {
        write!(conn, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", body.len())?;
        return Ok(());
    }
    let rest = &body[start..];
    if start > 0 {
        write!(
            conn,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            start,
            body.len() - 1,
            body.len(),
            rest.len()
        )?;
    } else {
        write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", rest.len())?;
    }
    let send = if fail { rest.len() / 2 } else { rest.len() };
    conn.write_all(&rest[..send])?;
    conn.flush()?;
    // Dropping the stream closes it; with `fail` that is before Content-Length bytes.
    Ok(())
}

fn check_extracted(dest: &Path, train: &CifarSplit, test: &CifarSplit) {
    let dir = dest.join(BATCHES_DIR);
    assert_eq!(&cifar::load_train(&dir).unwrap(), train);
    assert_eq!(&cifar::load_test(dest).unwrap(), test);
    assert!(dir.join("batches.meta.txt").is_file());
    // Nothing left over: no archive, no scratch folder.
    let mut names: Vec<_> = std::fs::read_dir(dest).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, vec![std::ffi::OsString::from(BATCHES_DIR)]);
}

#[test]
fn downloads_verifies_and_extracts() {
    let (archive, train, test) = make_archive();
    let server = Server::start(archive.clone(), Behaviour { ranges: true, failures: 0 });
    let dest = tempfile::tempdir().unwrap();
    let spec = DownloadSpec { url: server.url.clone(), md5: md5_hex(&archive).to_uppercase() };
    let out = download_cifar10(dest.path(), &spec, false).unwrap();
    assert_eq!(out, dest.path().join(BATCHES_DIR));
    check_extracted(dest.path(), &train, &test);
    assert_eq!(server.ranges(), vec![None]);

    // Complete destination: no request at all.
    let again = download_cifar10(dest.path(), &spec, false).unwrap();
    assert_eq!(again, out);
    assert_eq!(server.ranges().len(), 1);
}

#[test]
fn wrong_checksum_is_reported_and_leaves_nothing() {
    let (archive, _, _) = make_archive();
    let server = Server::start(archive, Behaviour { ranges: true, failures: 0 });
    let dest = tempfile::tempdir().unwrap();
    let spec = DownloadSpec { url: server.url.clone(), md5: "00000000000000000000000000000000".into() };
    let err = download_cifar10(dest.path(), &spec, false).unwrap_err();
    assert!(matches!(err, DownloadError::Checksum { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("checksum mismatch") && msg.contains("00000000000000000000000000000000"), "{msg}");
    assert_eq!(std::fs::read_dir(dest.path()).unwrap().count(), 0, "files left behind");
}

#[test]
fn interrupted_transfer_is_resumed_with_range_within_one_call() {
    let (archive, train, test) = make_archive();
    let server = Server::start(archive.clone(), Behaviour { ranges: true, failures: 1 });
    let dest = tempfile::tempdir().unwrap();
    let spec = DownloadSpec { url: server.url.clone(), md5: md5_hex(&archive) };
    download_cifar10(dest.path(), &spec, false).unwrap();
    check_extracted(dest.path(), &train, &test);
    let half = archive.len() / 2;
    assert_eq!(server.ranges(), vec![None, Some(format!("bytes={half}-"))]);
}

#[test]
fn interrupted_call_leaves_part_and_next_call_resumes() {
    let (archive, train, test) = make_archive();
    // More failures than one call's attempts: the first call gives up.
    let server = Server::start(archive.clone(), Behaviour { ranges: true, failures: 4 });
    let dest = tempfile::tempdir().unwrap();
    let spec = DownloadSpec { url: server.url.clone(), md5: md5_hex(&archive) };
    let err = download_cifar10(dest.path(), &spec, false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("interrupted") && msg.contains("run the download again to resume"), "{msg}");
    let DownloadError::Interrupted { received, attempts, .. } = err else { panic!("{err:?}") };
    assert_eq!(attempts, 4);
    assert!(received > 0 && (received as usize) < archive.len());
    let part = dest.path().join("cifar-10-binary.tar.gz.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), received);
    assert!(!dest.path().join(BATCHES_DIR).exists());

    download_cifar10(dest.path(), &spec, false).unwrap();
    check_extracted(dest.path(), &train, &test);
    let ranges = server.ranges();
    assert_eq!(ranges.len(), 5, "{ranges:?}");
    assert_eq!(ranges[4], Some(format!("bytes={received}-")));
}

#[test]
fn server_without_range_support_restarts_from_zero() {
    let (archive, train, test) = make_archive();
    let server = Server::start(archive.clone(), Behaviour { ranges: false, failures: 1 });
    let dest = tempfile::tempdir().unwrap();
    let spec = DownloadSpec { url: server.url.clone(), md5: md5_hex(&archive) };
    download_cifar10(dest.path(), &spec, false).unwrap();
    check_extracted(dest.path(), &train, &test);
    // It was asked for a range but answered 200 with the whole body.
    assert_eq!(server.ranges().len(), 2);
}

#[test]
fn complete_part_file_needs_no_network() {
    let (archive, train, test) = make_archive();
    let dest = tempfile::tempdir().unwrap();
    std::fs::write(dest.path().join("cifar-10-binary.tar.gz.part"), &archive).unwrap();
    // Port 9 (discard) has no listener here: any request would fail.
    let spec = DownloadSpec { url: "http://127.0.0.1:9/none".into(), md5: md5_hex(&archive) };
    download_cifar10(dest.path(), &spec, false).unwrap();
    check_extracted(dest.path(), &train, &test);
}

#[test]
fn http_error_status_is_reported() {
    let dest = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let spec = DownloadSpec { url: format!("http://{addr}/missing.tar.gz"), md5: "x".into() };
    let msg = download_cifar10(dest.path(), &spec, false).unwrap_err().to_string();
    assert!(msg.contains("404") && msg.contains("missing.tar.gz"), "{msg}");
    t.join().unwrap();
}

#[test]
fn corrupt_existing_copy_is_replaced() {
    let (archive, train, test) = make_archive();
    let server = Server::start(archive.clone(), Behaviour { ranges: true, failures: 0 });
    let dest = tempfile::tempdir().unwrap();
    let dir = dest.path().join(BATCHES_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(TEST_FILE), b"short").unwrap();
    let spec = DownloadSpec { url: server.url.clone(), md5: md5_hex(&archive) };
    download_cifar10(dest.path(), &spec, false).unwrap();
    check_extracted(dest.path(), &train, &test);
}
