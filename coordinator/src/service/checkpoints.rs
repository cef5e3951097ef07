//! Checkpoint upload and download. An upload is checked against the job before its first
//! byte is written (only rank 0 of the current attempt, at a position it can have reached,
//! within the model's size bound), written to a temp file of its own, verified against its
//! declared SHA-256, checked again, committed, and only then recorded; older checkpoints are
//! deleted after that.

use super::status::io_status;
use super::{on_state, read_full, BoxStream, Service};
use crate::state::{UploadClaim, UploadStage};
use cvdist_common::atomic_file::AtomicFile;
use cvdist_common::checkpoint::CheckpointState;
use cvdist_common::proto::{CheckpointChunk, DownloadCheckpointRequest, UploadCheckpointResponse};
use cvdist_common::{names, text, version};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use tracing::{info, warn};

/// Largest checkpoint state record (epoch, step, sums, checksum: a few hundred bytes).
const MAX_STATE_JSON: usize = 64 * 1024;

/// What a checkpoint upload said about itself, for the log line of a refusal.
#[derive(Default)]
struct UploadLabel {
    job_id: String,
    name: String,
    attempt: u32,
}

/// The next chunk of an upload, or an error once the stream has been idle too long.
async fn next_chunk(
    chunks: &mut Streaming<CheckpointChunk>,
    idle: Duration,
) -> Result<Option<CheckpointChunk>, Status> {
    tokio::time::timeout(idle, chunks.message()).await.map_err(|_| {
        Status::deadline_exceeded(format!("checkpoint upload sent nothing for {:.0} s; dropped", idle.as_secs_f64()))
    })?
}

fn checkpoint_name(name: &str) -> Result<(u32, u64), Status> {
    names::parse_checkpoint_name(name).map_err(|e| Status::invalid_argument(e.to_string()))
}

impl Service {
    /// `UploadCheckpoint`: stores the checkpoint, then deletes the job's older ones beyond
    /// `--keep-checkpoints`; a refusal is logged here and recorded in the job's log.
    pub(super) async fn upload(&self, chunks: Streaming<CheckpointChunk>) -> Result<UploadCheckpointResponse, Status> {
        let mut label = UploadLabel::default();
        let result = self.store_checkpoint(chunks, &mut label).await;
        match &result {
            Ok(stored) => {
                let (job_id, keep) = (label.job_id.clone(), self.keep_checkpoints);
                let pruned = on_state(&self.state, move |s| {
                    // Older checkpoints go only now, with the newer one durably stored.
                    let latest = s.get(&job_id).map(|j| j.latest_checkpoint).unwrap_or_default();
                    s.store().prune_checkpoints(&job_id, keep, &latest)
                })
                .await;
                let pruned = pruned.unwrap_or_else(|e| {
                    warn!(job = %label.job_id, error = %e.message(), "older checkpoints not pruned");
                    Vec::new()
                });
                for (name, e) in pruned {
                    match e {
                        None => {
                            info!(job = %label.job_id, checkpoint = %name, keep = self.keep_checkpoints, "older checkpoint deleted")
                        }
                        Some(e) => {
                            warn!(job = %label.job_id, checkpoint = %name, error = %e, "could not delete an older checkpoint")
                        }
                    }
                }
                info!(job = %label.job_id, name = %stored.name, bytes = stored.bytes, "checkpoint stored");
            }
            // Every refusal is logged here, whatever refused it: a worker only logs its
            // side, and an operator must see on the coordinator why checkpoints are missing.
            Err(status) => {
                // Debug formatting: the names come from the uploader and may hold anything.
                warn!(job = ?label.job_id, checkpoint = ?label.name, attempt = label.attempt, code = ?status.code(),
                    reason = %status.message(), "checkpoint upload refused");
                if !label.job_id.is_empty() {
                    let reason = format!("{:?}: {}", status.code(), status.message());
                    let UploadLabel { job_id, name, attempt } = std::mem::take(&mut label);
                    if let Err(e) =
                        on_state(&self.state, move |s| s.checkpoint_refused(&job_id, attempt, &name, &reason)).await
                    {
                        warn!(error = %e.message(), "the refusal was not recorded in the job's log");
                    }
                }
            }
        }
        result
    }

    /// `DownloadCheckpoint`: a stored checkpoint of a job, its record in the first chunk.
    pub(super) async fn download(&self, req: DownloadCheckpointRequest) -> Result<BoxStream<CheckpointChunk>, Status> {
        checkpoint_name(&req.name)?;
        let id = req.job_id.clone();
        on_state(&self.state, move |s| s.get(&id)).await??;
        let dir = self.state.store().checkpoint_dir(&req.job_id);
        let json_path = dir.join(format!("{}.json", req.name));
        let json = tokio::fs::read(&json_path).await.map_err(|e| {
            Status::not_found(format!("checkpoint {} of job {}: {e}", req.name, text::quoted(&req.job_id)))
        })?;
        let state = CheckpointState::from_json(&json)
            .map_err(|e| Status::data_loss(format!("{}: {e}", json_path.display())))?;
        let state = cvdist_common::proto::CheckpointState::from(&state);
        let data_path = dir.join(format!("{}.safetensors", req.name));
        let file = tokio::fs::File::open(&data_path).await.map_err(|e| io_status(&data_path, e))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut file = file;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; version::CHUNK_BYTES];
                let n = match read_full(&mut file, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                buf.truncate(n);
                let chunk = CheckpointChunk {
                    job_id: req.job_id.clone(),
                    name: req.name.clone(),
                    state: if first { Some(state.clone()) } else { None },
                    data: buf,
                    attempt: 0,
                    session_key: String::new(),
                };
                if (n == 0 && !first) || tx.send(Ok(chunk)).await.is_err() || n < version::CHUNK_BYTES {
                    return;
                }
                first = false;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Receives, verifies and stores one uploaded checkpoint; `label` is filled in as soon
    /// as the upload names its job, checkpoint and attempt.
    async fn store_checkpoint(
        &self,
        mut chunks: Streaming<CheckpointChunk>,
        label: &mut UploadLabel,
    ) -> Result<UploadCheckpointResponse, Status> {
        let idle = self.upload_idle_timeout;
        let first =
            next_chunk(&mut chunks, idle).await?.ok_or_else(|| Status::invalid_argument("empty checkpoint upload"))?;
        *label = UploadLabel { job_id: first.job_id.clone(), name: first.name.clone(), attempt: first.attempt };
        let pos = checkpoint_name(&first.name)?;
        let state_bytes = first.state.as_ref().map_or(0, prost::Message::encoded_len);
        if state_bytes > MAX_STATE_JSON {
            return Err(Status::invalid_argument(format!(
                "checkpoint state of {state_bytes} bytes exceeds {MAX_STATE_JSON}"
            )));
        }
        let state =
            CheckpointState::try_from(first.state.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if (state.epoch, state.step) != pos {
            return Err(Status::invalid_argument(format!(
                "checkpoint {} declares epoch {} step {}, not the position its name encodes",
                first.name, state.epoch, state.step
            )));
        }
        let claim = UploadClaim {
            job_id: first.job_id.clone(),
            attempt: first.attempt,
            session_key: first.session_key.clone(),
            name: first.name.clone(),
        };
        let limit = self.state.accepts_checkpoint(&claim, UploadStage::Started)?;
        let want_sha = state.sha256.clone();
        let dir = self.state.store().checkpoint_dir(&first.job_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_status(&dir, e))?;
        // One temp file per upload (`.NAME.safetensors.<random>.upload`): two uploads of one
        // name must not write into each other. Dropped uncommitted, it is deleted.
        let final_path = dir.join(format!("{}.safetensors", first.name));
        let dest = final_path.clone();
        let mut file = Some(
            tokio::task::spawn_blocking(move || AtomicFile::create_with_suffix(&dest, ".upload"))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| io_status(&dir, e))?,
        );
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut chunk = Some(first.clone());
        let result: Result<(), Status> = async {
            while let Some(c) = chunk {
                total += c.data.len() as u64;
                if total > limit {
                    return Err(Status::resource_exhausted(format!(
                        "checkpoint {} exceeds {limit} bytes, the most a checkpoint of this job's model can take",
                        first.name
                    )));
                }
                hasher.update(&c.data);
                let Some(mut f) = file.take() else { return Err(Status::internal("upload file lost")) };
                let (f, written) = tokio::task::spawn_blocking(move || {
                    let r = f.write_all(&c.data);
                    (f, r)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
                written.map_err(|e| io_status(f.temp_path(), e))?;
                file = Some(f);
                chunk = next_chunk(&mut chunks, idle).await?;
            }
            let got = hex::encode(hasher.finalize_reset());
            if got != want_sha {
                return Err(Status::data_loss(format!(
                    "checkpoint {} checksum {got} != declared {}",
                    first.name,
                    text::bound(&want_sha, 80)
                )));
            }
            // The uploader must still hold rank 0 of this attempt, and by now its report of
            // the epoch's last step has arrived.
            self.state.accepts_checkpoint(&claim, UploadStage::Complete)?;
            let Some(f) = file.take() else { return Err(Status::internal("upload file lost")) };
            let tmp = f.temp_path().to_path_buf();
            tokio::task::spawn_blocking(move || f.commit())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| io_status(&tmp, e))
        }
        .await;
        // On an error the uncommitted temp file is deleted here.
        drop(file);
        result?;
        let json_path = dir.join(format!("{}.json", first.name));
        let json_bytes = state.to_json();
        let jp = json_path.clone();
        let written = tokio::task::spawn_blocking(move || cvdist_common::atomic_file::write(&jp, &json_bytes))
            .await
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|r| r.map_err(|e| io_status(&json_path, e)));
        if let Err(e) = written {
            // Without its JSON commit record the tensor file is an orphan nothing reads.
            let _ = tokio::fs::remove_file(&final_path).await;
            return Err(e);
        }
        on_state(&self.state, move |s| s.checkpoint_stored(&claim)).await??;
        Ok(UploadCheckpointResponse { name: first.name, bytes: total })
    }
}
