//! Durable job records in an embedded redb database under `--state-dir`, plus each job's
//! run directory (`jobs/<id>/`) with the files users read. Every state change is written
//! before it is acknowledged, so a restarted coordinator picks up exactly where it was.

use cvdist_common::proto::JobInfo;
use cvdist_common::{names, rejoin, run_dir};
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Values that are not jobs; so far only [`ATTEMPT_KEY`].
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The key attempt secrets are derived from (`cvdist_common::rejoin`): kept so that a
/// restarted coordinator can check the re-registration proofs of a running attempt.
const ATTEMPT_KEY: &str = "attempt_key";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state dir {path} is not usable: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("state database {path}: {message}")]
    Db { path: PathBuf, message: String },
    #[error("stored job {id} cannot be decoded: {source}")]
    Decode { id: String, source: prost::DecodeError },
    #[error(transparent)]
    RunDir(#[from] run_dir::RunDirError),
}

pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    db: Database,
}

impl Store {
    /// Opens (or creates) the store; fails early with the path if the directory is unusable.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir { path: root.to_path_buf(), source };
        std::fs::create_dir_all(root.join("jobs")).map_err(dir_err)?;
        // Probe writability now: finding out at the first checkpoint would be too late.
        let probe = root.join(".write-probe");
        std::fs::write(&probe, b"ok").map_err(|source| StoreError::Dir { path: root.to_path_buf(), source })?;
        let _ = std::fs::remove_file(&probe);
        let db_path = root.join("state.redb");
        let db =
            Database::create(&db_path).map_err(|e| StoreError::Db { path: db_path.clone(), message: e.to_string() })?;
        let store = Store { root: root.to_path_buf(), db_path, db };
        // Create the table so read transactions on a fresh store succeed.
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    fn db_err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db { path: self.db_path.clone(), message: e.to_string() }
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(JOBS).map_err(|e| self.db_err(e))?;
            f(&mut table).map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    pub fn put_job(&self, job: &JobInfo) -> Result<(), StoreError> {
        let bytes = job.encode_to_vec();
        self.write(|t| t.insert(job.id.as_str(), bytes.as_slice()).map(|_| ()))
    }

    pub fn load_jobs(&self) -> Result<Vec<JobInfo>, StoreError> {
        let mut jobs = Vec::new();
        self.for_each_job(|job| jobs.push(job))?;
        Ok(jobs)
    }

    /// Decodes every stored job in id order and hands each to `f` in turn, so a caller that
    /// keeps only part of each record never holds all full records at once.
    pub fn for_each_job(&self, mut f: impl FnMut(JobInfo)) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.db_err(e))?;
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            let id = k.value().to_string();
            f(JobInfo::decode(v.value()).map_err(|source| StoreError::Decode { id, source })?);
        }
        Ok(())
    }

    /// The stored records of `ids`, in the same order, read in one transaction; `None` for
    /// an id that is not stored.
    pub fn get_jobs(&self, ids: &[&str]) -> Result<Vec<Option<JobInfo>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.db_err(e))?;
        ids.iter()
            .map(|id| match table.get(*id).map_err(|e| self.db_err(e))? {
                Some(v) => JobInfo::decode(v.value())
                    .map(Some)
                    .map_err(|source| StoreError::Decode { id: id.to_string(), source }),
                None => Ok(None),
            })
            .collect()
    }

    /// The key attempt secrets are derived from: read from the store, or made (random) and
    /// stored in one transaction on first use, so every coordinator on this state dir
    /// derives the same secrets.
    pub fn attempt_key(&self) -> Result<[u8; rejoin::KEY_BYTES], StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let key = {
            let mut table = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let stored: Option<[u8; rejoin::KEY_BYTES]> = table
                .get(ATTEMPT_KEY)
                .map_err(|e| self.db_err(e))?
                .and_then(|v| <[u8; rejoin::KEY_BYTES]>::try_from(v.value()).ok());
            match stored {
                Some(k) => k,
                None => {
                    let k: [u8; rejoin::KEY_BYTES] = rand::random();
                    table.insert(ATTEMPT_KEY, k.as_slice()).map_err(|e| self.db_err(e))?;
                    k
                }
            }
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(key)
    }

    /// The run directory of a job (ids are generated by us and validated, never user paths).
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join(run_dir::CHECKPOINT_DIR)
    }

    /// Deletes a job's older checkpoints: keeps the `keep` newest by position (epoch,
    /// step) and `latest` (the one a recovery resumes from, which after a change of world
    /// size can be older by position than one kept from before). `keep` 0 keeps all.
    ///
    /// Call only after the newest checkpoint and the job record naming it are durably
    /// stored. Each checkpoint's JSON commit record goes first, so a crash midway leaves an
    /// orphan tensor file rather than a record without its tensors. Returns each deleted
    /// name with the error that stopped its deletion, if any.
    pub fn prune_checkpoints(&self, job_id: &str, keep: usize, latest: &str) -> Vec<(String, Option<String>)> {
        if keep == 0 {
            return Vec::new();
        }
        let dir = self.checkpoint_dir(job_id);
        let mut stored: Vec<((u32, u64), String)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().strip_suffix(".json")?.to_string();
                Some((names::parse_checkpoint_name(&name).ok()?, name))
            })
            .collect();
        stored.sort();
        stored.reverse();
        let mut deleted = Vec::new();
        for (_, name) in stored.into_iter().skip(keep).filter(|(_, n)| n != latest) {
            let result =
                std::fs::remove_file(dir.join(format!("{name}.json"))).and_then(|_| {
                    match std::fs::remove_file(dir.join(format!("{name}.safetensors"))) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    }
                });
            deleted.push((name, result.err().map(|e| e.to_string())));
        }
        cvdist_common::atomic_file::sync_dir(&dir);
        deleted
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_checkpoint(dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.safetensors")), b"t").unwrap();
        std::fs::write(dir.join(format!("{name}.json")), b"{}").unwrap();
    }

    fn stored(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// Keeps the K newest by position and the checkpoint a recovery resumes from (after a
    /// change of world size a newer checkpoint can sit at an older position); deletes both
    /// files of every other one; `keep` 0 deletes nothing.
    #[test]
    fn prune_keeps_the_newest_and_the_resume_point() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let dir = store.checkpoint_dir("j0001-resnet20");
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "ckpt-e0000-s000004",
            "ckpt-e0001-s000000",
            "ckpt-e0001-s000004",
            "ckpt-e0001-s000008",
            "ckpt-e0002-s000000",
        ] {
            write_checkpoint(&dir, name);
        }
        assert!(store.prune_checkpoints("j0001-resnet20", 0, "ckpt-e0002-s000000").is_empty());
        assert_eq!(stored(&dir).len(), 10);

        let deleted = store.prune_checkpoints("j0001-resnet20", 2, "ckpt-e0001-s000000");
        let names: Vec<&str> = deleted
            .iter()
            .map(|(n, e)| {
                assert!(e.is_none(), "{n}: {e:?}");
                n.as_str()
            })
            .collect();
        assert_eq!(names, ["ckpt-e0001-s000004", "ckpt-e0000-s000004"]);
        assert_eq!(
            stored(&dir),
            [
                "ckpt-e0001-s000000.json",
                "ckpt-e0001-s000000.safetensors",
                "ckpt-e0001-s000008.json",
                "ckpt-e0001-s000008.safetensors",
                "ckpt-e0002-s000000.json",
                "ckpt-e0002-s000000.safetensors",
            ]
        );
    }

    /// The attempt key is made once and survives reopening the store (a restart).
    #[test]
    fn the_attempt_key_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Store::open(tmp.path()).unwrap().attempt_key().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.attempt_key().unwrap(), first);
        assert_eq!(store.attempt_key().unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Store::open(other.path()).unwrap().attempt_key().unwrap(), first);
    }
}
