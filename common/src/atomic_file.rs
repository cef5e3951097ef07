//! The one way cvdist replaces a file: write a temp file in the destination's directory,
//! fsync it, rename it over the destination, fsync the directory. A crash or a full disk
//! leaves either the old file or the new one, never a torn one, and a failed write leaves no
//! temp file behind (the temp file is deleted when an [`AtomicFile`] is dropped uncommitted).
//!
//! Temp names come from `tempfile` (`.<name>.<random>.tmp`), so two processes writing the
//! same destination at once (workers sharing a cache dir) never write into one temp file;
//! the last rename wins, whole.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file being written that becomes `dest` only on [`AtomicFile::commit`].
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."))
}

impl AtomicFile {
    /// Creates the temp file next to `dest` (creating the directory if needed).
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        AtomicFile::create_with_suffix(dest, ".tmp")
    }

    /// As [`AtomicFile::create`], with the temp name ending in `suffix` (the coordinator's
    /// checkpoint uploads use `.upload`, so an operator can tell them apart).
    pub fn create_with_suffix(dest: &Path, suffix: &str) -> io::Result<AtomicFile> {
        let dir = parent_of(dest);
        std::fs::create_dir_all(dir)?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(suffix);
        // tempfile creates 0600 files; ours get what `File::create` gives (0666 less the umask),
        // so run directories and checkpoints are as readable as any other file the user creates.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let tmp = builder.tempfile_in(dir)?;
        Ok(AtomicFile { tmp, dest: dest.to_path_buf() })
    }

    /// The temp file's path (for error messages about writes into it).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Where the file goes on commit.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The open temp file.
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// fsyncs the data, renames the temp file to the destination and fsyncs the directory
    /// (best effort: some filesystems cannot fsync a directory; the rename itself is done).
    pub fn commit(self) -> io::Result<()> {
        self.tmp.as_file().sync_all()?;
        let dir = parent_of(&self.dest).to_path_buf();
        // On failure `PersistError` hands the temp file back; dropping it deletes it.
        self.tmp.persist(&self.dest).map_err(|e| e.error)?;
        sync_dir(&dir);
        Ok(())
    }
}

// Straight to the file: `NamedTempFile`'s own `Write` appends the temp path to every error,
// and callers already name the path in theirs.
impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.as_file_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tmp.as_file_mut().flush()
    }
}

/// Replaces `path` with `bytes` atomically (see the module docs).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// fsyncs a directory so renames and deletions in it survive a crash. Best effort: errors
/// are ignored because some filesystems refuse to open or sync directories.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("a.json");
        write(&p, b"first").unwrap();
        write(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(names(p.parent().unwrap()), ["a.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // 0666 less a umask: at least readable by its owner and never executable.
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o600, 0o600, "{mode:o}");
            assert_eq!(mode & 0o111, 0, "{mode:o}");
        }
    }

    #[test]
    fn uncommitted_file_is_removed_and_the_old_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.bin");
        write(&p, b"old").unwrap();
        let mut f = AtomicFile::create(&p).unwrap();
        f.write_all(b"partial").unwrap();
        let tmp = f.temp_path().to_path_buf();
        assert!(tmp.file_name().unwrap().to_string_lossy().starts_with(".c.bin."));
        assert!(tmp.exists());
        drop(f);
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["c.bin"]);
    }

    #[test]
    fn concurrent_writers_get_distinct_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let mut a = AtomicFile::create(&p).unwrap();
        let mut b = AtomicFile::create(&p).unwrap();
        assert_ne!(a.temp_path(), b.temp_path());
        a.write_all(b"aaaa").unwrap();
        b.write_all(b"bb").unwrap();
        a.commit().unwrap();
        b.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"bb");
        assert_eq!(names(dir.path()), ["x"]);
    }
}
