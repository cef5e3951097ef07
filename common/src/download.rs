//! Download of the official CIFAR-10 binary archive.
//!
//! The archive is fetched into `DEST/cifar-10-binary.tar.gz.part`. An interrupted transfer
//! leaves that file behind and the next attempt (within the same call, or a later call)
//! resumes it with an HTTP `Range` request; a server that ignores `Range` answers 200 and
//! the transfer restarts from byte 0. The md5 of the whole archive is checked before
//! anything is extracted; extraction goes to a scratch folder inside `DEST`, is validated
//! with the [`crate::cifar`] reader, and only then renamed to `DEST/cifar-10-batches-bin`,
//! so a failed download never leaves a half-extracted data set behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::cifar::{self, CifarError, BATCHES_DIR};

/// Where the official archive is published.
pub const DEFAULT_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// md5 of the official archive, as published next to it.
pub const DEFAULT_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

const PART_FILE: &str = "cifar-10-binary.tar.gz.part";
/// Transfers that fail mid-body are resumed this many times within one call before giving
/// up (the `.part` file stays for a later call).
const MAX_ATTEMPTS: u32 = 4;

/// What to fetch: the archive URL and its expected md5 (lowercase or uppercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadSpec {
    pub url: String,
    pub md5: String,
}

impl Default for DownloadSpec {
    /// The official archive.
    fn default() -> Self {
        Self { url: DEFAULT_URL.to_string(), md5: DEFAULT_MD5.to_string() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot {action} {path}: {source}", path = .path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("request to {url} failed: {source}")]
    Request { url: String, source: Box<ureq::Error> },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} answered 206 with Content-Range {got:?}, but bytes from offset {offset} were asked for")]
    BadRange { url: String, offset: u64, got: String },
    #[error("download of {url} was interrupted after {received} bytes, {attempts} attempts ({source}); run the download again to resume from {part}", part = .part.display())]
    Interrupted { url: String, received: u64, attempts: u32, part: PathBuf, source: io::Error },
    #[error("checksum mismatch for {url}: md5 is {actual}, expected {expected}; the corrupt archive was deleted and nothing was extracted")]
    Checksum { url: String, expected: String, actual: String },
    #[error("cannot extract {archive}: {source}", archive = .archive.display())]
    Extract { archive: PathBuf, source: io::Error },
    #[error("archive from {url} has no {BATCHES_DIR}/ folder; is it the CIFAR-10 binary version?")]
    NotCifar { url: String },
    #[error("extracted data failed validation: {0}")]
    Invalid(#[from] CifarError),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DownloadError + 'a {
    move |source| DownloadError::Io { action, path: path.to_path_buf(), source }
}

/// Ensures `dest/cifar-10-batches-bin` holds a valid CIFAR-10 copy, downloading and
/// extracting `spec` if it does not; returns that folder. A valid existing copy makes this
/// a no-op (no network access).
pub fn download_cifar10(dest: &Path, spec: &DownloadSpec, progress: bool) -> Result<PathBuf, DownloadError> {
    let target = dest.join(BATCHES_DIR);
    if validate(&target).is_ok() {
        return Ok(target);
    }
    fs::create_dir_all(dest).map_err(io_err("create", dest))?;
    let part = dest.join(PART_FILE);
    let expected = spec.md5.to_ascii_lowercase();

    // A `.part` left complete by a run that died before extracting needs no network.
    let complete = part.is_file() && md5_file(&part)? == expected;
    if !complete {
        fetch(&spec.url, &part, progress)?;
        let actual = md5_file(&part)?;
        if actual != expected {
            // Resuming a corrupt archive would only append to the corruption.
            let _ = fs::remove_file(&part);
            return Err(DownloadError::Checksum { url: spec.url.clone(), expected, actual });
        }
    }

    let scratch = dest.join(format!(".cifar-extract-{}", std::process::id()));
    let result = extract_and_install(&spec.url, &part, &scratch, &target, progress);
    let _ = fs::remove_dir_all(&scratch);
    result?;
    fs::remove_file(&part).map_err(io_err("remove", &part))?;
    Ok(target)
}

fn validate(dir: &Path) -> Result<(), CifarError> {
    cifar::load_test(dir)?;
    cifar::load_train(dir)?;
    Ok(())
}

fn extract_and_install(
    url: &str,
    archive: &Path,
    scratch: &Path,
    target: &Path,
    progress: bool,
) -> Result<(), DownloadError> {
    if progress {
        eprintln!("extracting {}", archive.display());
    }
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).map_err(io_err("create", scratch))?;
    let file = File::open(archive).map_err(io_err("open", archive))?;
    // `unpack` refuses entries that would escape `scratch` (absolute paths, `..`).
    tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)))
        .unpack(scratch)
        .map_err(|source| DownloadError::Extract { archive: archive.to_path_buf(), source })?;
    let extracted = scratch.join(BATCHES_DIR);
    if !extracted.is_dir() {
        return Err(DownloadError::NotCifar { url: url.to_string() });
    }
    validate(&extracted)?;
    if target.exists() {
        // Only reached when the existing copy failed validation: replace it whole.
        fs::remove_dir_all(target).map_err(io_err("remove invalid", target))?;
    }
    fs::rename(&extracted, target).map_err(io_err("move extracted data to", target))
}

fn md5_file(path: &Path) -> Result<String, DownloadError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        // Per read rather than for the whole body: the archive is 160 MB and may be slow,
        // but a stalled connection should fail (and be resumed), not hang.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Downloads `url` into `part`, resuming what is already there; retries transfers that
/// break off, up to `MAX_ATTEMPTS` in all.
fn fetch(url: &str, part: &Path, progress: bool) -> Result<(), DownloadError> {
    let agent = agent();
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("CIFAR-10");
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        match fetch_once(&agent, url, part, &bar) {
            Ok(()) => {
                bar.finish_and_clear();
                return Ok(());
            }
            Err(Attempt::Fatal(e)) => {
                bar.abandon();
                return Err(e);
            }
            Err(Attempt::Broken(source)) => {
                let received = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
                if attempts >= MAX_ATTEMPTS {
                    bar.abandon();
                    return Err(DownloadError::Interrupted {
                        url: url.to_string(),
                        received,
                        attempts,
                        part: part.to_path_buf(),
                        source,
                    });
                }
                if progress {
                    bar.println(format!("transfer interrupted at {received} bytes ({source}); resuming"));
                }
            }
        }
    }
}

enum Attempt {
    /// Worth retrying: the transfer broke off.
    Broken(io::Error),
    Fatal(DownloadError),
}

fn fetch_once(agent: &ureq::Agent, url: &str, part: &Path, bar: &indicatif::ProgressBar) -> Result<(), Attempt> {
    let offset = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if offset > 0 {
        request = request.header("Range", format!("bytes={offset}-"));
    }
    let response = match request.call() {
        Ok(r) => r,
        // Connection-level failures before any body byte: treat like a broken transfer
        // only if it is an I/O problem (reset, timeout), not e.g. a bad URL.
        Err(ureq::Error::Io(e)) => return Err(Attempt::Broken(e)),
        Err(ureq::Error::Timeout(t)) => {
            return Err(Attempt::Broken(io::Error::new(io::ErrorKind::TimedOut, t.to_string())))
        }
        Err(e) => return Err(Attempt::Fatal(DownloadError::Request { url: url.to_string(), source: Box::new(e) })),
    };
    let status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let content_length = header("content-length").and_then(|v| v.parse::<u64>().ok());
    let start = match status {
        206 => {
            let got = header("content-range").unwrap_or_default();
            if content_range_start(&got) != Some(offset) {
                return Err(Attempt::Fatal(DownloadError::BadRange { url: url.to_string(), offset, got }));
            }
            offset
        }
        200 => 0,
        // Our `.part` is at or past the end of what the server has: start over.
        416 => {
            fs::remove_file(part).map_err(|e| Attempt::Fatal(io_err("remove", part)(e)))?;
            return Err(Attempt::Broken(io::Error::other("server rejected the resume offset (416); restarting")));
        }
        _ => return Err(Attempt::Fatal(DownloadError::Status { url: url.to_string(), status })),
    };

    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(|e| Attempt::Fatal(io_err("open", part)(e)))?;
    // 200 to a ranged request means the server ignores Range: overwrite from byte 0.
    file.set_len(start).map_err(|e| Attempt::Fatal(io_err("truncate", part)(e)))?;
    file.seek(SeekFrom::Start(start)).map_err(|e| Attempt::Fatal(io_err("seek", part)(e)))?;
    if let Some(len) = content_length {
        bar.set_length(start + len);
    }
    bar.set_position(start);

    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Everything received so far is already in `part`, ready to resume.
            Err(e) => return Err(Attempt::Broken(e)),
        };
        file.write_all(&buf[..n]).map_err(|e| Attempt::Fatal(io_err("write", part)(e)))?;
        bar.inc(n as u64);
    }
    file.sync_all().map_err(|e| Attempt::Fatal(io_err("sync", part)(e)))?;
    Ok(())
}

/// The first byte position of a `Content-Range: bytes START-END/TOTAL` header.
fn content_range_start(value: &str) -> Option<u64> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/1"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
        assert_eq!(content_range_start(""), None);
    }
}
