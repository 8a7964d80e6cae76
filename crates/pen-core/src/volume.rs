//! Read-only volumes (SPEC "Volumes"): `volumes/<name>.sqfs`, squashfs images packed on the
//! host, attached to VMs as `NAME:/guest/path`. This module is the data: names, the guest
//! path rules, what a volume file says about itself, and which VMs use a volume. Packing
//! is pen-build's (`pen_build::volume`); attaching is the runtime's. Which VMs use a volume
//! is the CLI's question (it reads every `vm.json`), so this module needs no `vm`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::paths::PenHome;
use crate::{names, UsageError};

/// How many volumes one VM can mount (the runtime's fixed number of volume disk slots).
pub const MAX_VOLUMES: usize = 8;

/// One volume attached to a VM, as `vm.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's name (`volumes/<name>.sqfs`).
    pub name: String,
    /// Where the guest mounts it: absolute, normalised (see [`check_guest_path`]).
    pub path: String,
}

impl std::fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.path)
    }
}

/// Guest paths a volume may not be mounted on or inside: the guest's API filesystems and
/// the workspace, which pen mounts itself.
const RESERVED: [&str; 6] = ["/workspace", "/proc", "/sys", "/dev", "/run", "/tmp"];

/// Checks a guest mount point and returns it normalised (no `.`, no repeated or trailing
/// `/`). The error says why, without the value (callers name it).
pub fn check_guest_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err("is not an absolute path".into());
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("contains '..'".into()),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err("is the guest's root".into());
    }
    let normal = format!("/{}", parts.join("/"));
    for reserved in RESERVED {
        if normal == reserved {
            return Err(format!("is {reserved}, which pen mounts itself"));
        }
        if is_inside(&normal, reserved) {
            return Err(format!("is inside {reserved}, which pen mounts itself"));
        }
    }
    Ok(normal)
}

/// True when `path` lies strictly below `dir` (both normalised).
fn is_inside(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Parses `NAME:/guest/path` (`--volume`, a profile's `volumes`). `what` names where it came
/// from in the message (`--volume`, `profile dev`).
pub fn parse_spec(what: &str, text: &str) -> Result<VolumeMount, UsageError> {
    let Some((name, path)) = text.split_once(':') else {
        return Err(UsageError::new(format!(
            "{what} {text:?} is not NAME:/GUEST/PATH; e.g. --volume models:/opt/models"
        )));
    };
    names::validate("volume", name)?;
    let path = check_guest_path(path).map_err(|why| {
        UsageError::new(format!(
            "{what} {text:?}: the guest path {path:?} {why}; give an absolute path such as /opt/{name}, outside /workspace, /proc, /sys, /dev, /run and /tmp"
        ))
    })?;
    Ok(VolumeMount {
        name: name.to_string(),
        path,
    })
}

/// Checks a VM's whole list: at most [`MAX_VOLUMES`], no two on one path or one inside
/// another (the outer one is read-only: the inner mount point could not be made).
pub fn check_mounts(mounts: &[VolumeMount]) -> Result<(), UsageError> {
    if mounts.len() > MAX_VOLUMES {
        return Err(UsageError::new(format!(
            "{} volumes given; a VM can mount at most {MAX_VOLUMES}: pack related directories into one volume",
            mounts.len()
        )));
    }
    for (i, a) in mounts.iter().enumerate() {
        for b in &mounts[i + 1..] {
            if a.path == b.path {
                return Err(UsageError::new(format!(
                    "two volumes on one path: {a} and {b}; give each its own path"
                )));
            }
            if is_inside(&a.path, &b.path) || is_inside(&b.path, &a.path) {
                return Err(UsageError::new(format!(
                    "volumes {a} and {b} nest (volumes are read-only, so the inner mount point cannot be made); give each a path of its own"
                )));
            }
        }
    }
    Ok(())
}

/// Refuses (usage error) a volume that does not exist; `context` starts the message.
pub fn check_exists(home: &PenHome, name: &str, context: &str) -> Result<(), UsageError> {
    if home.volume_file(name).is_file() {
        return Ok(());
    }
    let known: Vec<String> = list(home).into_iter().map(|v| v.name).collect();
    let hint = if known.is_empty() {
        format!("there are no volumes yet; `pen volume create {name} --from DIR` makes one")
    } else {
        format!(
            "existing volumes: {}; `pen volume create {name} --from DIR` makes it",
            known.join(", ")
        )
    };
    Err(UsageError::new(format!(
        "{context}: no volume named {name:?}; {hint}"
    )))
}

/// What `pen volume list` shows of one volume file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub path: PathBuf,
    /// Bytes of the squashfs file.
    pub size: u64,
    /// Inodes in the image (files, directories, links), from its superblock.
    pub files: Option<u32>,
    /// When this version was packed (the file's mtime), seconds since the epoch.
    pub created_at: u64,
}

/// A squashfs superblock starts with this magic, then the inode count (u32, little endian).
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";

/// The inode count of a squashfs image, from its superblock (`None`: not squashfs).
pub fn squashfs_inode_count(head: &[u8]) -> Option<u32> {
    if head.get(0..4)? != SQUASHFS_MAGIC {
        return None;
    }
    Some(u32::from_le_bytes(head.get(4..8)?.try_into().ok()?))
}

/// Reads one volume file's facts.
pub fn info(home: &PenHome, name: &str) -> Option<VolumeInfo> {
    use std::io::Read;
    let path = home.volume_file(name);
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut head = [0u8; 8];
    let files = std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut head))
        .ok()
        .and_then(|()| squashfs_inode_count(&head));
    let created_at = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Some(VolumeInfo {
        name: name.to_string(),
        path,
        size: meta.len(),
        files,
        created_at,
    })
}

/// Every volume, sorted by name. Anything that is not `<valid name>.sqfs` is skipped, so
/// the temporary file of a create in progress (`.NAME.sqfs.XXXXXX`) is.
pub fn list(home: &PenHome) -> Vec<VolumeInfo> {
    let Ok(entries) = std::fs::read_dir(home.volumes()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_str()?.to_string();
            let name = file.strip_suffix(".sqfs")?;
            names::validate("volume", name).ok()?;
            Some(name.to_string())
        })
        .collect();
    names.sort();
    names.iter().filter_map(|n| info(home, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert_eq!(check_guest_path("/opt/models").unwrap(), "/opt/models");
        assert_eq!(check_guest_path("//opt/./models/").unwrap(), "/opt/models");
        assert_eq!(
            check_guest_path("/workspacex").unwrap(),
            "/workspacex",
            "a sibling of /workspace is fine"
        );
        for (bad, why) in [
            ("opt/models", "absolute"),
            ("", "absolute"),
            ("/", "root"),
            ("//", "root"),
            ("/opt/../etc", "'..'"),
            ("/workspace", "/workspace"),
            ("/workspace/", "/workspace"),
            ("/workspace/data", "inside /workspace"),
            ("/proc", "/proc"),
            ("/sys/x", "inside /sys"),
            ("/dev", "/dev"),
            ("/run", "/run"),
            ("/tmp", "/tmp"),
            ("/tmp/a", "inside /tmp"),
        ] {
            let err = check_guest_path(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("--volume", "models:/opt/models/").unwrap(),
            VolumeMount {
                name: "models".into(),
                path: "/opt/models".into()
            }
        );
        // The first ':' splits: a path may hold more.
        assert_eq!(
            parse_spec("--volume", "m:/opt/a:b").unwrap().path,
            "/opt/a:b"
        );
        for (bad, words) in [
            ("models", "NAME:/GUEST/PATH"),
            ("Models:/opt/m", "invalid volume name \"Models\""),
            (":/opt/m", "invalid volume name \"\""),
            ("models:opt/m", "not an absolute path"),
            ("models:/", "root"),
            ("models:/workspace/m", "inside /workspace"),
            ("models:/a/../b", "'..'"),
        ] {
            let err = parse_spec("--volume", bad).unwrap_err().to_string();
            assert!(err.contains(words), "{bad}: {err}");
        }
        assert!(parse_spec("--volume", "models:opt/m")
            .unwrap_err()
            .to_string()
            .contains("\"models:opt/m\""));
    }

    fn m(name: &str, path: &str) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            path: path.into(),
        }
    }

    #[test]
    fn mount_lists() {
        check_mounts(&[m("a", "/opt/a"), m("a", "/opt/b"), m("b", "/opt/ab")]).unwrap();
        let err = check_mounts(&[m("a", "/opt/a"), m("b", "/opt/a")]).unwrap_err();
        assert!(err.to_string().contains("two volumes on one path"), "{err}");
        let err = check_mounts(&[m("a", "/opt/a"), m("b", "/opt/a/b")]).unwrap_err();
        assert!(err.to_string().contains("nest"), "{err}");
        let many: Vec<_> = (0..=MAX_VOLUMES)
            .map(|i| m("a", &format!("/v{i}")))
            .collect();
        let err = check_mounts(&many).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
        check_mounts(&many[..MAX_VOLUMES]).unwrap();
    }

    #[test]
    fn superblock_inode_count() {
        let mut head = b"hsqs".to_vec();
        head.extend_from_slice(&2001u32.to_le_bytes());
        assert_eq!(squashfs_inode_count(&head), Some(2001));
        assert_eq!(squashfs_inode_count(b"hsq"), None);
        assert_eq!(squashfs_inode_count(b"xxxx\x01\0\0\0"), None);
    }

    #[test]
    fn lists_volumes_and_skips_temporaries() {
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        assert!(list(&home).is_empty());
        std::fs::create_dir_all(home.volumes()).unwrap();
        let mut sb = b"hsqs".to_vec();
        sb.extend_from_slice(&7u32.to_le_bytes());
        std::fs::write(home.volume_file("models"), &sb).unwrap();
        std::fs::write(home.volumes().join(".models.sqfs.tmp1"), &sb).unwrap();
        std::fs::write(home.volumes().join("notes.txt"), "x").unwrap();
        let all = list(&home);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, "models");
        assert_eq!(all[0].files, Some(7));
        assert_eq!(all[0].size, 8);
        assert!(check_exists(&home, "models", "--volume").is_ok());
        let err = check_exists(&home, "data", "--volume data:/d").unwrap_err();
        assert!(
            err.to_string()
                .contains("no volume named \"data\"; existing volumes: models"),
            "{err}"
        );
    }
}
