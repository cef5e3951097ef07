//! `FetchDataset`: the coordinator's CIFAR-10 files, each in chunks with the chunk's and, at
//! its last chunk, the whole file's SHA-256, so a worker verifies what it caches.

use super::status::io_status;
use super::{read_full, BoxStream};
use cvdist_common::proto::DatasetChunk;
use cvdist_common::{cifar, text, version};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokio::sync::mpsc;
use tonic::Status;

/// Streams the files of `dataset` from `data_dir`; refused unless it is the data set served
/// and every file of it is there.
pub(super) async fn stream(data_dir: Option<&Path>, dataset: &str) -> Result<BoxStream<DatasetChunk>, Status> {
    let served = cvdist_common::choices::Dataset::Cifar10.as_str();
    if dataset != served {
        return Err(Status::invalid_argument(format!(
            "unknown dataset {}; only \"{served}\" is served",
            text::quoted(dataset)
        )));
    }
    let dir = data_dir.ok_or_else(|| {
        Status::failed_precondition(
            "this coordinator has no dataset to serve; start it with --data DIR or give workers --data",
        )
    })?;
    let batches = cifar::batches_dir(dir);
    let mut files: Vec<&str> = cifar::TRAIN_FILES.to_vec();
    files.push(cifar::TEST_FILE);
    for f in &files {
        if !tokio::fs::metadata(batches.join(f)).await.is_ok_and(|m| m.is_file()) {
            return Err(Status::failed_precondition(format!(
                "coordinator's dataset is incomplete: {} missing",
                batches.join(f).display()
            )));
        }
    }
    let (tx, rx) = mpsc::channel(4);
    let names: Vec<String> = files.iter().map(|s| s.to_string()).collect();
    tokio::spawn(async move {
        for name in names {
            let path = batches.join(&name);
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(io_status(&path, e))).await;
                    return;
                }
            };
            let mut whole = Sha256::new();
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; version::CHUNK_BYTES];
                let n = match read_full(&mut file, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(io_status(&path, e))).await;
                        return;
                    }
                };
                buf.truncate(n);
                whole.update(&buf);
                let last = n < version::CHUNK_BYTES;
                let chunk = DatasetChunk {
                    file: name.clone(),
                    offset,
                    chunk_sha256: hex::encode(Sha256::digest(&buf)),
                    file_sha256: if last { hex::encode(whole.clone().finalize()) } else { String::new() },
                    data: buf,
                    last_of_file: last,
                };
                offset += n as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                if last {
                    break;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
