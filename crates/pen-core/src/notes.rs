//! What a supervisor has noticed about its running VM that the user should see in `pen
//! list` (today: the host file system holding the VM's disk filled up).
//!
//! The notes live in the VM's runtime directory and go with the supervisor. The file is
//! given its full size ([`NOTES_SIZE`], padded with spaces) when the supervisor starts and
//! is only ever rewritten in place, so that a note can still be written when the disk it is
//! about (which may hold the runtime directory too, `/tmp`) has no block left. A reader
//! that catches a write halfway sees no notes, never a wrong one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The notes file's fixed size; notes are a few hundred bytes.
pub const NOTES_SIZE: usize = 4096;

/// A supervisor's notes about its VM. Empty: nothing to say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notes {
    /// The host file system holding the VM's overlay disk ran out of space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_disk_full: Option<DiskFull>,
}

/// When and where the host disk filled up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFull {
    /// Seconds since the epoch of the first write that failed.
    pub since: u64,
    /// The VM's disk file, on the file system that is full.
    pub disk: String,
    /// The guest got I/O errors (the host filled up faster than the guest could be told):
    /// its file system needs a restart, and the note stays until then.
    #[serde(default)]
    pub io_errors: bool,
}

impl Notes {
    pub fn is_empty(&self) -> bool {
        self.host_disk_full.is_none()
    }

    /// The notes as lines for a person, about VM `name`.
    pub fn lines(&self, name: &str) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(full) = &self.host_disk_full {
            lines.push(disk_full_message(name, &full.disk));
        }
        lines
    }
}

/// What pen says when the host disk holding a VM's disk is full: what happened, what the
/// guest sees, and the fix.
pub fn disk_full_message(name: &str, disk: &str) -> String {
    let dir = Path::new(disk)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| disk.to_string());
    format!(
        "pen: the host file system holding VM {name}'s disk ({dir}) is full: the guest's writes to its disk fail. Free space on the host (df {dir}); if the guest reported I/O errors, restart the VM (`pen stop {name}`): its disk is checked at the next start"
    )
}

/// The notes file of a running supervisor; only it writes.
pub struct NotesFile {
    file: File,
}

impl NotesFile {
    /// Creates `path` (0600) at its full size, with no notes in it.
    pub fn create(path: &Path) -> std::io::Result<NotesFile> {
        let file = crate::fsutil::create_private_file(path)?;
        let notes = NotesFile { file };
        notes.write(&Notes::default())?;
        Ok(notes)
    }

    /// Replaces the notes, in place: no block is allocated after [`NotesFile::create`].
    pub fn write(&self, notes: &Notes) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(notes).map_err(std::io::Error::other)?;
        if bytes.len() > NOTES_SIZE {
            return Err(std::io::Error::other("notes larger than their file"));
        }
        bytes.resize(NOTES_SIZE, b' ');
        self.file.write_all_at(&bytes, 0)
    }
}

/// The notes at `path`; none when there is no file (the VM is stopped) or it cannot be read.
pub fn read(path: &Path) -> Notes {
    let mut text = String::new();
    let read = File::open(path).and_then(|f| f.take(NOTES_SIZE as u64).read_to_string(&mut text));
    if read.is_err() {
        return Notes::default();
    }
    serde_json::from_str(text.trim()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_rewritten_in_place_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.json");
        assert_eq!(read(&path), Notes::default(), "no file, no notes");
        let file = NotesFile::create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), NOTES_SIZE as u64);
        assert!(read(&path).is_empty());
        let notes = Notes {
            host_disk_full: Some(DiskFull {
                since: 1_700_000_000,
                disk: "/h/vms/dev/overlay.img".into(),
                io_errors: true,
            }),
        };
        file.write(&notes).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), NOTES_SIZE as u64);
        assert_eq!(read(&path), notes);
        let lines = notes.lines("dev");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("(/h/vms/dev) is full"), "{}", lines[0]);
        assert!(lines[0].contains("pen stop dev"), "{}", lines[0]);
        file.write(&Notes::default()).unwrap();
        assert!(read(&path).is_empty());
        // A torn or foreign file reads as no notes, never as an error.
        std::fs::write(&path, b"{\"host_disk_full\": {\"si").unwrap();
        assert!(read(&path).is_empty());
    }
}
