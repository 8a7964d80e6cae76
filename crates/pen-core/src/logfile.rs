//! Logs whose contents a guest chooses (its console, the supervisor's log of what QEMU,
//! virtiofsd and the guest said, image build output) must not fill the host's disk: each
//! is capped, and rotated to one `.1` file when full, so a log and its `.1` together stay
//! under twice the cap. A new run starts a new log and keeps the previous run's as `.1`: a
//! crash's evidence survives the restart that follows it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fsutil::create_private_file;

/// Cap of `console.log` (the guest's serial console). The console carries the kernel's and
/// pen-init's messages, and a serial port is slow (about 0.4 MB/s under TCG): 4 MiB holds
/// far more than any boot says.
pub const CONSOLE_LOG_MAX: u64 = 4 << 20;
/// Cap of `supervisor.log`.
pub const SUPERVISOR_LOG_MAX: u64 = 16 << 20;
/// Cap of a profile image's `build.log`.
pub const BUILD_LOG_MAX: u64 = 16 << 20;

/// `path` with `.1` appended: where a full (or the previous run's) log goes.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file of at most `cap` bytes; when full, it becomes `.1` (replacing the older one)
/// and writing goes on in a new file. Clones share the file and its count.
#[derive(Clone)]
pub struct CappedLog(Arc<Mutex<Inner>>);

struct Inner {
    path: PathBuf,
    file: File,
    len: u64,
    cap: u64,
}

impl CappedLog {
    /// Starts a new log at `path` (0600); a non-empty previous one becomes `.1`.
    pub fn start(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            std::fs::rename(path, rotated(path))?;
        }
        Self::open(path, cap)
    }

    /// Goes on writing the log at `path` (created, 0600, when missing).
    pub fn append(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        Self::open(path, cap)
    }

    fn open(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(CappedLog(Arc::new(Mutex::new(Inner {
            path: path.to_path_buf(),
            file,
            len,
            cap: cap.max(1),
        }))))
    }
}

impl CappedLog {
    /// Copies everything `source` yields into this log until its end (every write end of a
    /// pipe closed) or a read error. Write errors are ignored: a full disk must not stall
    /// the writer on the other side (QEMU, the guest's console), so the pipe keeps draining.
    pub fn drain_from(mut self, mut source: impl std::io::Read) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let _ = self.write_all(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Inner {
    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.file = create_private_file(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self).flush()
    }
}

impl Write for &CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.len >= inner.cap {
            inner.rotate()?;
        }
        let room = (inner.cap - inner.len).min(buf.len() as u64) as usize;
        let n = inner.file.write(&buf[..room])?;
        inner.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn a_log_never_outgrows_its_cap_and_keeps_one_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::start(&path, 1000).unwrap();
        for i in 0..50u8 {
            log.write_all(&[b'a' + (i % 26); 333]).unwrap();
            assert!(len(&path) <= 1000);
            assert!(len(&rotated(&path)) <= 1000);
        }
        // 50 * 333 = 16650 bytes written: the newest 650 in the log, 1000 before them in .1.
        assert_eq!(len(&path), 650);
        assert_eq!(len(&rotated(&path)), 1000);
        assert_eq!(
            std::fs::read(&path).unwrap().last(),
            Some(&(b'a' + 49 % 26))
        );
        // A clone shares the count.
        let mut other = log.clone();
        other.write_all(&[b'z'; 350]).unwrap();
        assert_eq!(len(&path), 1000);
        log.write_all(b"!").unwrap();
        assert_eq!(len(&path), 1);
    }

    #[test]
    fn a_new_run_keeps_the_previous_log_as_dot_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("supervisor.log");
        std::fs::write(&path, b"the crash's last words\n").unwrap();
        let mut log = CappedLog::start(&path, 1 << 20).unwrap();
        log.write_all(b"next run\n").unwrap();
        assert_eq!(
            std::fs::read(rotated(&path)).unwrap(),
            b"the crash's last words\n"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"next run\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Appending goes on where the log is.
        let mut more = CappedLog::append(&path, 1 << 20).unwrap();
        more.write_all(b"more\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"next run\nmore\n");
        // An empty previous log is not worth a rotation.
        let empty = dir.path().join("empty.log");
        std::fs::write(&empty, b"").unwrap();
        CappedLog::start(&empty, 10).unwrap();
        assert!(!rotated(&empty).exists());
    }
}
