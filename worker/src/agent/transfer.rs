//! Moving bulk data through the coordinator: the dataset for workers that have no local
//! copy, and checkpoints (rank 0 uploads them; a resuming group downloads the newest).
//! Every chunk and every file is checked against its SHA-256.

use crate::train::checkpoint::CheckpointState;
use cvdist_common::atomic_file::AtomicFile;
use cvdist_common::choices::Dataset;
use cvdist_common::client::Client;
use cvdist_common::proto::{CheckpointChunk, DownloadCheckpointRequest, FetchDatasetRequest};
use cvdist_common::{cifar, version};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("coordinator refused: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt transfer of {what}: {reason}")]
    Corrupt { what: String, reason: String },
}

impl TransferError {
    fn rpc(s: &tonic::Status) -> TransferError {
        TransferError::Rpc { code: s.code(), message: s.message().to_string() }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io { path: path.to_path_buf(), source }
}

/// Fetches CIFAR-10 from the coordinator into `cache/cifar10` unless a verified copy is
/// already there; returns the directory to load from.
pub async fn fetch_dataset(client: &mut Client, cache: &Path) -> Result<PathBuf, TransferError> {
    let root = cache.join(Dataset::Cifar10.as_str());
    let batches = cifar::batches_dir(&root);
    let marker = batches.join(".complete");
    if marker.is_file() {
        return Ok(root);
    }
    std::fs::create_dir_all(&batches).map_err(io(&batches))?;
    let mut stream = client
        .fetch_dataset(FetchDatasetRequest { dataset: Dataset::Cifar10.to_string() })
        .await
        .map_err(|s| TransferError::rpc(&s))?
        .into_inner();
    let mut current: Option<(String, AtomicFile, Sha256)> = None;
    let mut files = 0;
    while let Some(chunk) = stream.message().await.map_err(|s| TransferError::rpc(&s))? {
        if !cvdist_common::spec::valid_name(&chunk.file) {
            return Err(TransferError::Corrupt {
                what: "dataset".into(),
                reason: format!("bad file name {:?}", chunk.file),
            });
        }
        if hex::encode(Sha256::digest(&chunk.data)) != chunk.chunk_sha256 {
            return Err(TransferError::Corrupt {
                what: chunk.file.clone(),
                reason: format!("chunk at offset {} fails its checksum", chunk.offset),
            });
        }
        if current.as_ref().map(|c| c.0 != chunk.file).unwrap_or(true) {
            // Unique temp names: workers sharing a cache dir may fetch at the same time, and
            // one temp name would interleave their writes into one file. A file left
            // unfinished (stream broken, bad checksum) is deleted when it is dropped.
            let dest = batches.join(&chunk.file);
            let f = AtomicFile::create(&dest).map_err(io(&dest))?;
            current = Some((chunk.file.clone(), f, Sha256::new()));
        }
        let Some((name, file, hasher)) = current.as_mut() else { continue };
        file.write_all(&chunk.data).map_err(|e| io(file.temp_path())(e))?;
        hasher.update(&chunk.data);
        if chunk.last_of_file {
            let got = hex::encode(hasher.clone().finalize());
            if got != chunk.file_sha256 {
                return Err(TransferError::Corrupt {
                    what: name.clone(),
                    reason: format!("file checksum {got} != {}", chunk.file_sha256),
                });
            }
            if let Some((name, file, _)) = current.take() {
                file.commit().map_err(io(&batches.join(name)))?;
            }
            files += 1;
        }
    }
    if files != cifar::TRAIN_FILES.len() + 1 {
        return Err(TransferError::Corrupt {
            what: "dataset".into(),
            reason: format!("stream ended after {files} files"),
        });
    }
    std::fs::write(&marker, b"").map_err(io(&marker))?;
    Ok(root)
}

/// Uploads a checkpoint written by [`crate::train::checkpoint::save`].
pub async fn upload_checkpoint(
    client: &mut Client,
    job_id: &str,
    attempt: u32,
    session_key: &str,
    json_path: &Path,
    state: &CheckpointState,
) -> Result<(), TransferError> {
    let data_path = json_path.with_extension("safetensors");
    let bytes = tokio::fs::read(&data_path).await.map_err(io(&data_path))?;
    let name = state.name();
    let job_id = job_id.to_string();
    let mut chunks: Vec<CheckpointChunk> = bytes
        .chunks(version::CHUNK_BYTES)
        .map(|c| CheckpointChunk {
            job_id: job_id.clone(),
            name: name.clone(),
            data: c.to_vec(),
            attempt,
            ..Default::default()
        })
        .collect();
    if chunks.is_empty() {
        chunks.push(CheckpointChunk { job_id: job_id.clone(), name: name.clone(), attempt, ..Default::default() });
    }
    chunks[0].state = Some(state.into());
    chunks[0].session_key = session_key.to_string();
    client.upload_checkpoint(tokio_stream::iter(chunks)).await.map_err(|s| TransferError::rpc(&s))?;
    Ok(())
}

/// Downloads a checkpoint into `dir`; returns the path of its JSON record. The tensor
/// file's checksum is verified when the trainer loads it.
pub async fn download_checkpoint(
    client: &mut Client,
    job_id: &str,
    name: &str,
    dir: &Path,
) -> Result<PathBuf, TransferError> {
    // The name becomes a file name here: the same check as on the coordinator's side.
    cvdist_common::names::parse_checkpoint_name(name)
        .map_err(|e| TransferError::Corrupt { what: "checkpoint name".into(), reason: e.to_string() })?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut stream = client
        .download_checkpoint(DownloadCheckpointRequest { job_id: job_id.into(), name: name.into() })
        .await
        .map_err(|s| TransferError::rpc(&s))?
        .into_inner();
    let data_path = dir.join(format!("{name}.safetensors"));
    let json_path = dir.join(format!("{name}.json"));
    // Both files appear whole or not at all: a broken stream leaves no half checkpoint that
    // a later resume could pick up.
    let mut file = AtomicFile::create(&data_path).map_err(io(&data_path))?;
    let mut state = None;
    while let Some(chunk) = stream.message().await.map_err(|s| TransferError::rpc(&s))? {
        if chunk.state.is_some() {
            state = chunk.state;
        }
        file.write_all(&chunk.data).map_err(io(&data_path))?;
    }
    let Some(state) = state else {
        return Err(TransferError::Corrupt { what: name.into(), reason: "no checkpoint state received".into() });
    };
    let state = CheckpointState::try_from(state)
        .map_err(|e| TransferError::Corrupt { what: name.into(), reason: e.to_string() })?;
    file.commit().map_err(io(&data_path))?;
    cvdist_common::atomic_file::write(&json_path, &state.to_json()).map_err(io(&json_path))?;
    Ok(json_path)
}
