//! Snapshot directories: finding and checking one, saving one atomically, listing and
//! pruning them.
//!
//! A snapshot is read through a descriptor of its directory, opened once: if another pen
//! replaces the directory meanwhile, this reader still sees one consistent set of files.
//! A new snapshot is written into a temporary directory beside the others and renamed into
//! place complete; when two VMs save the same key at once, the first rename wins and the
//! other discards its copy.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use super::{ram, short_key, BinaryIdentity, BootFiles, Identity, Manifest, StateCheck, FORMAT};
use pen_core::fsutil::sync_dir;

const MANIFEST: &str = "snapshot.json";
const STATE: &str = "state";
const RAM: &str = "ram";
/// Prefixes of directories that are not snapshots (yet, or any more).
const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";
/// A temporary directory older than this belongs to a save that died.
const ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// A device state stream is a few MB at most (guest RAM is not in it); a corrupt size field
/// must not make us allocate gigabytes.
const MAX_STATE: u64 = 256 << 20;

/// One snapshot directory, held open.
pub struct SnapshotDir {
    path: PathBuf,
    dir: File,
    key: String,
}

impl SnapshotDir {
    fn open(root: &Path, key: &str) -> std::io::Result<Option<SnapshotDir>> {
        let path = root.join(key);
        match File::open(&path) {
            Ok(dir) if dir.metadata()?.is_dir() => Ok(Some(SnapshotDir {
                path,
                dir,
                key: key.to_string(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open_file(&self, name: &str) -> std::io::Result<File> {
        let fd = openat(
            Some(self.dir.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// A second handle on the same directory (for discarding it after the snapshot was
    /// handed to a restore).
    pub fn clone_handle(&self) -> Option<SnapshotDir> {
        Some(SnapshotDir {
            path: self.path.clone(),
            dir: self.dir.try_clone().ok()?,
            key: self.key.clone(),
        })
    }

    /// Removes the directory, unless it was replaced since we opened it (a fresh snapshot
    /// another VM saved in the meantime is not ours to remove).
    pub fn discard(&self) {
        let (Ok(ours), Ok(now)) = (self.dir.metadata(), std::fs::metadata(&self.path)) else {
            return;
        };
        if (ours.dev(), ours.ino()) != (now.dev(), now.ino()) {
            return;
        }
        let Some(root) = self.path.parent() else {
            return;
        };
        let trash = root.join(format!(
            "{TRASH_PREFIX}{}-{}",
            short_key(&self.key),
            std::process::id()
        ));
        if std::fs::rename(&self.path, &trash).is_ok() {
            let _ = std::fs::remove_dir_all(&trash);
        }
    }
}

/// A snapshot whose manifest matches and whose files have the recorded sizes. Checksums
/// are verified while reading ([`Snapshot::read_state`], [`Snapshot::load_ram`]).
pub struct Snapshot {
    pub manifest: Manifest,
    pub dir: SnapshotDir,
    state: File,
    ram: File,
}

impl Snapshot {
    pub fn key(&self) -> &str {
        self.dir.key()
    }

    /// The device state, checked against the manifest.
    pub fn read_state(&self) -> Result<Vec<u8>, String> {
        let expected = &self.manifest.state;
        let mut bytes = Vec::with_capacity(expected.size.min(MAX_STATE) as usize);
        (&self.state)
            .take(MAX_STATE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the device state: {e}"))?;
        if bytes.len() as u64 != expected.size {
            return Err(format!(
                "the device state is {} bytes, the manifest says {}",
                bytes.len(),
                expected.size
            ));
        }
        if StateCheck::of(&bytes) != *expected {
            return Err("the device state's checksum does not match".into());
        }
        Ok(bytes)
    }

    /// Copies the guest RAM into `memfd` (fresh, `ram_size` bytes), checking it.
    pub fn load_ram(&self, memfd: &File, ram_size: u64) -> Result<(), String> {
        ram::load(&self.ram, &self.manifest.ram, memfd, ram_size)
    }
}

/// What [`find`] found for an identity.
pub enum Lookup {
    Missing,
    Found(Box<Snapshot>),
    /// Present but unusable (`reason` is for a notice); remove it with `dir.discard()`.
    Invalid {
        reason: String,
        dir: SnapshotDir,
    },
}

/// Looks up the snapshot for `identity` under `root` (`images/snapshots`) and checks what
/// can be checked without reading it all: the manifest (against `identity` and the boot
/// `files`) and the sizes of its files.
pub fn find(root: &Path, identity: &Identity, files: &BootFiles) -> Lookup {
    let key = identity.key();
    let dir = match SnapshotDir::open(root, &key) {
        Ok(Some(dir)) => dir,
        Ok(None) => return Lookup::Missing,
        Err(e) => {
            // Unreadable: treat as missing, and the save that follows will fail loudly
            // enough in the supervisor log.
            eprintln!("snapshot: cannot open {}: {e}", root.join(&key).display());
            return Lookup::Missing;
        }
    };
    match check(&dir, identity, files) {
        Ok((manifest, state, ram)) => Lookup::Found(Box::new(Snapshot {
            manifest,
            dir,
            state,
            ram,
        })),
        Err(reason) => Lookup::Invalid { reason, dir },
    }
}

fn check(
    dir: &SnapshotDir,
    identity: &Identity,
    files: &BootFiles,
) -> Result<(Manifest, File, File), String> {
    let mut bytes = Vec::new();
    dir.open_file(MANIFEST)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("snapshot.json is unreadable ({e})"))?;
    let manifest = Manifest::parse(&bytes)?;
    if let Some(reason) = manifest.mismatch(dir.key(), identity, files) {
        return Err(reason);
    }
    let open = |name: &str, what: &str, size: u64| -> Result<File, String> {
        let file = dir
            .open_file(name)
            .map_err(|e| format!("the {what} is unreadable ({e})"))?;
        let len = file
            .metadata()
            .map_err(|e| format!("the {what} is unreadable ({e})"))?
            .len();
        if len != size {
            return Err(format!(
                "the {what} is {len} bytes, the manifest says {size}"
            ));
        }
        Ok(file)
    };
    let state = open(STATE, "device state", manifest.state.size)?;
    let ram = open(RAM, "RAM image", manifest.ram.file_size)?;
    Ok((manifest, state, ram))
}

/// A snapshot being written. Dropped without [`Pending::commit`], its directory goes.
pub struct Pending {
    root: PathBuf,
    identity: Identity,
    files: BootFiles,
    tmp: tempfile::TempDir,
    state: Option<StateCheck>,
    ram: Option<ram::RamCheck>,
}

/// How a commit ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    Installed,
    /// Another VM saved the same snapshot first; ours was discarded.
    AlreadyThere,
}

impl Pending {
    pub fn create(root: &Path, identity: Identity, files: BootFiles) -> anyhow::Result<Pending> {
        pen_core::fsutil::create_private_dir_all(root)?;
        sweep_abandoned(root, ABANDONED_AFTER);
        let tmp = tempfile::Builder::new()
            .prefix(&format!(
                "{TMP_PREFIX}{}-{}-",
                short_key(&identity.key()),
                std::process::id()
            ))
            .tempdir_in(root)
            .with_context(|| format!("creating a directory in {}", root.display()))?;
        Ok(Pending {
            root: root.to_path_buf(),
            identity,
            files,
            tmp,
            state: None,
            ram: None,
        })
    }

    pub fn write_state(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.tmp.path().join(STATE);
        pen_core::fsutil::create_private_file(&path)
            .and_then(|mut f| f.write_all(bytes))
            .with_context(|| format!("writing {}", path.display()))?;
        self.state = Some(StateCheck::of(bytes));
        Ok(())
    }

    /// Copies the guest RAM out of `memfd`. The guest must be stopped.
    pub fn write_ram(&mut self, memfd: &File, ram_size: u64) -> anyhow::Result<()> {
        let path = self.tmp.path().join(RAM);
        let out = pen_core::fsutil::create_private_file(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let check = ram::save(memfd, ram_size, &out)
            .with_context(|| format!("writing {}", path.display()))?;
        self.ram = Some(check);
        Ok(())
    }

    /// Writes the manifest, makes everything durable and renames the directory into place.
    pub fn commit(self, qemu_version: String) -> anyhow::Result<Committed> {
        let (Some(state), Some(ram)) = (self.state.clone(), self.ram.clone()) else {
            anyhow::bail!("internal error: snapshot committed before its files were written");
        };
        let key = self.identity.key();
        let manifest = Manifest {
            format: FORMAT,
            key: key.clone(),
            identity: self.identity.clone(),
            boot_files: self.files.clone(),
            qemu_version,
            created_at: pen_core::vm::now_secs(),
            state,
            ram,
        };
        let mut json = serde_json::to_vec_pretty(&manifest)?;
        json.push(b'\n');
        let dir = self.tmp.path();
        let mut f = pen_core::fsutil::create_private_file(&dir.join(MANIFEST))?;
        f.write_all(&json)?;
        for name in [MANIFEST, STATE, RAM] {
            File::open(dir.join(name))
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", dir.join(name).display()))?;
        }
        sync_dir(dir);
        pen_core::testpoint::pause("snapshot commit");
        let tmp = self.tmp.keep();
        let target = self.root.join(&key);
        match std::fs::rename(&tmp, &target) {
            Ok(()) => {
                sync_dir(&self.root);
                Ok(Committed::Installed)
            }
            // rename(2) only replaces an empty directory: someone else's snapshot is there.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(Committed::AlreadyThere)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e).with_context(|| format!("renaming into {}", target.display()))
            }
        }
    }
}

/// Removes temporary and trash directories older than `age` (saves that died midway), and
/// at once the temporary directories whose writer is gone (`.tmp-<key>-<pid>-<random>`: a
/// supervisor killed while saving).
fn sweep_abandoned(root: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(TMP_PREFIX) && !name.starts_with(TRASH_PREFIX) {
            continue;
        }
        let writer_gone = name
            .strip_prefix(TMP_PREFIX)
            .and_then(|rest| rest.split('-').nth(1))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        let old = writer_gone
            || entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|a| a >= age);
        if old {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One snapshot for `pen image list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotRow {
    pub key: String,
    /// Bytes of its files.
    pub size: u64,
    /// `None` when its manifest is unreadable.
    pub manifest: Option<Manifest>,
}

/// Every snapshot directory under `root`, oldest first.
pub fn list_in(root: &Path) -> Vec<SnapshotRow> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut rows: Vec<SnapshotRow> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let path = e.path();
            let size = std::fs::read_dir(&path)
                .map(|files| {
                    files
                        .flatten()
                        .filter_map(|f| f.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            let manifest = std::fs::read(path.join(MANIFEST))
                .ok()
                .and_then(|b| Manifest::parse(&b).ok());
            SnapshotRow {
                key: e.file_name().to_string_lossy().into_owned(),
                size,
                manifest,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.manifest.as_ref().map(|m| m.created_at).unwrap_or(0));
    rows
}

/// A snapshot `pen image prune` removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pruned {
    pub key: String,
    pub size: u64,
    pub reason: String,
}

/// Removes stale snapshots: unreadable, of another format or pen version, for another QEMU
/// binary than `qemu` (when known), or for an image not in `current_images` (ids of the
/// images that exist now). Also removes what dead saves left behind.
pub fn prune_in(
    root: &Path,
    current_images: &[String],
    qemu: Option<&BinaryIdentity>,
) -> Vec<Pruned> {
    sweep_abandoned(root, ABANDONED_AFTER);
    let mut pruned = Vec::new();
    for row in list_in(root) {
        let reason = match &row.manifest {
            None => Some("unreadable manifest".to_string()),
            Some(m) => stale_reason(m, current_images, qemu),
        };
        let Some(reason) = reason else { continue };
        if std::fs::remove_dir_all(root.join(&row.key)).is_ok() {
            pruned.push(Pruned {
                key: row.key,
                size: row.size,
                reason,
            });
        }
    }
    pruned
}

pub(super) fn stale_reason(
    m: &Manifest,
    current_images: &[String],
    qemu: Option<&BinaryIdentity>,
) -> Option<String> {
    if m.format != FORMAT {
        return Some(format!("format {}", m.format));
    }
    if m.identity.pen_version != pen_core::VERSION {
        return Some(format!("made by pen {}", m.identity.pen_version));
    }
    if qemu.is_some_and(|q| *q != m.identity.qemu) {
        return Some("made with another QEMU".into());
    }
    if !current_images.contains(&m.identity.image_id) {
        return Some(format!(
            "image {} no longer exists",
            short_key(&m.identity.image_id)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{files, identity};
    use std::os::unix::fs::FileExt;

    const RAM_SIZE: u64 = 16 * ram::PAGE;

    fn memfd_like() -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(RAM_SIZE).unwrap();
        f.write_all_at(&[7u8; 4096], 3 * ram::PAGE).unwrap();
        f
    }

    fn save(root: &Path, id: &Identity) -> Committed {
        let mut p = Pending::create(root, id.clone(), files()).unwrap();
        p.write_state(b"device state").unwrap();
        p.write_ram(&memfd_like(), RAM_SIZE).unwrap();
        p.commit("7.2.22".into()).unwrap()
    }

    fn found(root: &Path, id: &Identity) -> Box<Snapshot> {
        match find(root, id, &files()) {
            Lookup::Found(s) => s,
            Lookup::Missing => panic!("missing"),
            Lookup::Invalid { reason, .. } => panic!("invalid: {reason}"),
        }
    }

    fn invalid(root: &Path, id: &Identity) -> (String, SnapshotDir) {
        match find(root, id, &files()) {
            Lookup::Invalid { reason, dir } => (reason, dir),
            _ => panic!("expected an invalid snapshot"),
        }
    }

    #[test]
    fn save_find_and_restore() {
        let root = tempfile::tempdir().unwrap();
        let id = identity();
        assert!(matches!(find(root.path(), &id, &files()), Lookup::Missing));
        assert_eq!(save(root.path(), &id), Committed::Installed);
        let snap = found(root.path(), &id);
        assert_eq!(snap.key(), id.key());
        assert_eq!(snap.read_state().unwrap(), b"device state");
        let ram = tempfile::tempfile().unwrap();
        ram.set_len(RAM_SIZE).unwrap();
        snap.load_ram(&ram, RAM_SIZE).unwrap();
        let mut page = [0u8; 4096];
        ram.read_exact_at(&mut page, 3 * ram::PAGE).unwrap();
        assert_eq!(page, [7u8; 4096]);
        // Nothing temporary is left.
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![id.key()]);
    }

    #[test]
    fn second_save_of_the_same_key_is_discarded() {
        let root = tempfile::tempdir().unwrap();
        let id = identity();
        assert_eq!(save(root.path(), &id), Committed::Installed);
        assert_eq!(save(root.path(), &id), Committed::AlreadyThere);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        found(root.path(), &id);
    }

    #[test]
    fn other_shapes_do_not_find_it() {
        let root = tempfile::tempdir().unwrap();
        let id = identity();
        save(root.path(), &id);
        let mut other = identity();
        other.memory_mb *= 2;
        assert!(matches!(
            find(root.path(), &other, &files()),
            Lookup::Missing
        ));
    }

    #[test]
    fn damaged_files_are_reported_and_discarded() {
        let root = tempfile::tempdir().unwrap();
        let id = identity();
        let dir = root.path().join(id.key());

        // Truncated RAM image: caught by the size check.
        save(root.path(), &id);
        let ram = File::options().write(true).open(dir.join(RAM)).unwrap();
        ram.set_len(ram.metadata().unwrap().len() - 1).unwrap();
        let (reason, handle) = invalid(root.path(), &id);
        assert!(reason.starts_with("the RAM image is"), "{reason}");
        handle.discard();
        assert!(!dir.exists());

        // Corrupted device state: same size, caught by its checksum on reading.
        save(root.path(), &id);
        std::fs::write(dir.join(STATE), b"DEVICE STATE").unwrap();
        let snap = found(root.path(), &id);
        assert_eq!(
            snap.read_state().unwrap_err(),
            "the device state's checksum does not match"
        );

        // Unreadable manifest.
        std::fs::write(dir.join(MANIFEST), b"{").unwrap();
        let (reason, _) = invalid(root.path(), &id);
        assert!(
            reason.starts_with("snapshot.json is unreadable"),
            "{reason}"
        );

        // A missing file.
        std::fs::remove_dir_all(&dir).unwrap();
        save(root.path(), &id);
        std::fs::remove_file(dir.join(STATE)).unwrap();
        let (reason, _) = invalid(root.path(), &id);
        assert!(
            reason.starts_with("the device state is unreadable"),
            "{reason}"
        );
    }

    #[test]
    fn edited_manifest_is_a_mismatch() {
        let root = tempfile::tempdir().unwrap();
        let id = identity();
        save(root.path(), &id);
        let path = root.path().join(id.key()).join(MANIFEST);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"0.1.0\"", "\"0.0.1\"")).unwrap();
        let (reason, _) = invalid(root.path(), &id);
        assert_eq!(reason, "pen version differs (snapshot: 0.0.1, now: 0.1.0)");
    }

    #[test]
    fn discard_spares_a_replacement() {
        let root = tempfile::tempdir().unwrap();
        let id = identity();
        save(root.path(), &id);
        let old = found(root.path(), &id);
        // Someone replaces it meanwhile.
        std::fs::remove_dir_all(root.path().join(id.key())).unwrap();
        save(root.path(), &id);
        old.dir.discard();
        found(root.path(), &id);
    }

    #[test]
    fn list_and_prune() {
        let root = tempfile::tempdir().unwrap();
        let mut id = identity();
        id.pen_version = pen_core::VERSION.into();
        save(root.path(), &id);
        let mut other = id.clone();
        other.image_id = "0ld".into();
        save(root.path(), &other);
        std::fs::create_dir(root.path().join("junk")).unwrap();
        std::fs::create_dir(root.path().join(".tmp-fresh")).unwrap();

        let rows = list_in(root.path());
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.key != ".tmp-fresh"));
        let ours = rows.iter().find(|r| r.key == id.key()).unwrap();
        assert!(ours.size > 4096, "{}", ours.size);

        let pruned = prune_in(
            root.path(),
            std::slice::from_ref(&id.image_id),
            Some(&id.qemu),
        );
        let mut reasons: Vec<(String, String)> =
            pruned.into_iter().map(|p| (p.key, p.reason)).collect();
        reasons.sort();
        let mut expected = vec![
            ("junk".to_string(), "unreadable manifest".to_string()),
            (other.key(), "image 0ld no longer exists".to_string()),
        ];
        expected.sort();
        assert_eq!(reasons, expected);
        found(root.path(), &id);
        // A fresh temporary directory may be a save in progress: kept.
        assert!(root.path().join(".tmp-fresh").exists());
        sweep_abandoned(root.path(), Duration::ZERO);
        assert!(!root.path().join(".tmp-fresh").exists());
    }
}
