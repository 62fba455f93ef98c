//! Crash-safe file replacement: a temp file beside the target, fsync, rename, fsync of the
//! directory. A crash (or a full disk) at any point leaves either the old file or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` atomically, creating missing parent directories; the new file
/// gets permission bits `mode` (Unix).
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per write, so concurrent writers of one path never share a temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut file = create(&tmp, mode)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporary files that writers of `path` left behind when they were killed
/// mid-write; returns how many. Call it before the first write of a process.
pub fn remove_leftovers(path: &Path) -> io::Result<usize> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Ok(0);
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(unix)]
fn create(path: &Path, mode: u32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // A leftover temp file from a crashed writer of the same pid is replaced.
    let _ = fs::remove_file(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

#[cfg(not(unix))]
fn create(path: &Path, _mode: u32) -> io::Result<File> {
    let _ = fs::remove_file(path);
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_whole_files_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        super::write(&p, b"one", 0o600).unwrap();
        super::write(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
        let nested = dir.path().join("new/dirs/f");
        super::write(&nested, b"x", 0o600).unwrap();
        assert_eq!(std::fs::read(&nested).unwrap(), b"x");
        // A parent that is a file cannot become a directory.
        assert!(super::write(&p.join("child"), b"x", 0o600).is_err());
    }

    #[test]
    fn leftovers_of_killed_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ckpt");
        super::write(&p, b"good", 0o600).unwrap();
        std::fs::write(dir.path().join(".ckpt.tmp-123-0"), b"half").unwrap();
        std::fs::write(dir.path().join(".ckpt.tmp-456-7"), b"ha").unwrap();
        std::fs::write(dir.path().join(".other.tmp-1-0"), b"not ours").unwrap();
        assert_eq!(super::remove_leftovers(&p).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".other.tmp-1-0", "ckpt"]);
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(
            super::remove_leftovers(&dir.path().join("none/x")).unwrap(),
            0
        );
    }
}
