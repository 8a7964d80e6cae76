//! Free space on the file system that holds pen's files, judged before pen writes much there:
//! below a floor, VMs are neither created nor started and images and volumes not built;
//! above it, a VM start warns when the space left is small against what the VMs on that file
//! system could still write. Overlay disks are sparse files of a fixed size: what one can
//! still grow by is its size minus the blocks it holds (a fixed "less than 10G free" would
//! warn always, or never).
//!
//! [`judge`] is the pure decision (unit tested); [`Disk::of`] and [`growth_of`] read the
//! figures it needs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::size::human;

/// The default floor: room for a VM's first writes (logs, the overlay's ext4 journal and
/// metadata, a snapshot's device state) or a small image, with some to spare.
pub const DEFAULT_FLOOR: u64 = 256 << 20;

/// `PEN_MIN_FREE` (a size, or `0` for no floor) sets the floor.
pub const FLOOR_VAR: &str = "PEN_MIN_FREE";

/// The floor in force: [`FLOOR_VAR`] when set, else [`DEFAULT_FLOOR`].
pub fn floor() -> Result<u64, crate::UsageError> {
    match std::env::var(FLOOR_VAR) {
        Ok(v) if v.trim() == "0" => Ok(0),
        Ok(v) if !v.trim().is_empty() => crate::size::parse_size(FLOOR_VAR, &v),
        _ => Ok(DEFAULT_FLOOR),
    }
}

/// The file system holding a directory: its device and free bytes (for an unprivileged
/// writer: `f_bavail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    pub dev: u64,
    pub free: u64,
}

impl Disk {
    /// The file system of `dir`, or of its nearest existing ancestor (a directory pen is
    /// about to create).
    pub fn of(dir: &Path) -> std::io::Result<Disk> {
        let existing = dir
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        let st = nix::sys::statvfs::statvfs(existing)?;
        Ok(Disk {
            dev: std::fs::metadata(existing)?.dev(),
            free: st.blocks_available() * st.fragment_size(),
        })
    }
}

/// What the sparse file `path` can still grow by: its size minus the bytes it holds
/// (0 when it is missing). With its device, to keep only files on the same file system.
pub fn growth_of(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), growth(meta.len(), meta.blocks() * 512)))
}

/// Size minus allocated bytes, never negative (a file with preallocated blocks past its end).
pub fn growth(apparent: u64, allocated: u64) -> u64 {
    apparent.saturating_sub(allocated)
}

/// What pen is about to do, for the messages.
pub struct Intent<'a> {
    /// "start VM dev", "build profile rust's image", "create volume tools".
    pub what: &'a str,
    /// The directory whose file system it writes to.
    pub dir: &'a Path,
    pub free: u64,
    pub floor: u64,
    /// What this VM's disk can still grow by (0 for builds).
    pub this_growth: u64,
    /// The same for each other VM on that file system.
    pub others_growth: &'a [u64],
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Go ahead, but say this line.
    Warn(String),
    /// Refuse with this line.
    Refuse(String),
}

/// Refuse below the floor; warn when free space is less than what the VMs on that file
/// system (this one included) could still write.
pub fn judge(i: &Intent) -> Verdict {
    let place = i.dir.display();
    if i.free < i.floor {
        return Verdict::Refuse(format!(
            "cannot {}: {} free on the file system holding {place}, below pen's floor of {}; \
             free some space there (`pen delete` VMs you no longer need, `pen image prune`), \
             or set {FLOOR_VAR} to a lower size (0 for none)",
            i.what,
            human(i.free),
            human(i.floor)
        ));
    }
    let others: u64 = i.others_growth.iter().sum();
    let could_write = i.this_growth.saturating_add(others);
    if i.this_growth > 0 && i.free < could_write {
        let others_part = match i.others_growth.len() {
            0 => String::new(),
            n => format!(
                " and {n} other {} by {}",
                if n == 1 { "VM's" } else { "VMs'" },
                human(others)
            ),
        };
        return Verdict::Warn(format!(
            "warning: {} free on the file system holding {place}, while this VM's disk can \
             still grow by {}{others_part}: a guest that fills it gets write errors; free \
             some space there or `pen delete` VMs you no longer need",
            human(i.free),
            human(i.this_growth),
        ));
    }
    Verdict::Fine
}

/// Checks the room for `what` (writing under `dir`): `Err` with the refusal below the
/// floor; a warning printed (`pen: warning: ...`) when `this_growth` and `others_growth`
/// (what VM disks on that file system could still write) exceed the free space.
pub fn ensure_room(
    what: &str,
    dir: &Path,
    this_growth: u64,
    others_growth: &[u64],
) -> anyhow::Result<()> {
    let floor = floor()?;
    let Ok(disk) = Disk::of(dir) else {
        // Nothing to judge by (statvfs refused): the write itself will say.
        return Ok(());
    };
    match judge(&Intent {
        what,
        dir,
        free: disk.free,
        floor,
        this_growth,
        others_growth,
    }) {
        Verdict::Fine => Ok(()),
        Verdict::Warn(line) => {
            eprintln!("pen: {line}");
            Ok(())
        }
        Verdict::Refuse(line) => anyhow::bail!("{line}"),
    }
}

/// [`ensure_room`] for starting (or creating) VM `name` of `disk_size`, against the other
/// VMs under `vms`.
pub fn ensure_vm_room(what: &str, vms: &Path, name: &str, disk_size: u64) -> anyhow::Result<()> {
    let dir = vms.join(name);
    match vm_figures(vms, &dir.join("overlay.img"), disk_size) {
        Ok((_, this, others)) => ensure_room(what, &dir, this, &others),
        Err(_) => ensure_room(what, &dir, disk_size, &[]),
    }
}

/// The figures for starting (or creating) a VM whose overlay is `overlay` (missing before
/// the first boot: it then can grow by all of `disk_size`), against the other VMs' overlays
/// under `vms`.
pub fn vm_figures(
    vms: &Path,
    overlay: &Path,
    disk_size: u64,
) -> std::io::Result<(Disk, u64, Vec<u64>)> {
    let disk = Disk::of(overlay.parent().unwrap_or(vms))?;
    let this = match growth_of(overlay) {
        Some((_, g)) => g,
        None => disk_size,
    };
    let mut others = Vec::new();
    for entry in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        let other: PathBuf = entry.path().join("overlay.img");
        if other == overlay {
            continue;
        }
        if let Some((dev, g)) = growth_of(&other) {
            if dev == disk.dev {
                others.push(g);
            }
        }
    }
    Ok((disk, this, others))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    fn intent(free: u64, this: u64, others: &[u64]) -> Verdict {
        judge(&Intent {
            what: "start VM dev",
            dir: Path::new("/home/u/.config/pen/vms/dev"),
            free,
            floor: DEFAULT_FLOOR,
            this_growth: this,
            others_growth: others,
        })
    }

    #[test]
    fn below_the_floor_is_refused_with_the_figures_and_the_fix() {
        let Verdict::Refuse(line) = intent(100 * M, 9 * G, &[]) else {
            panic!("not refused")
        };
        assert!(line.contains("100M free"), "{line}");
        assert!(line.contains("floor of 256M"), "{line}");
        assert!(line.contains("/home/u/.config/pen/vms/dev"), "{line}");
        assert!(
            line.contains("pen delete") && line.contains(FLOOR_VAR),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_warning_only_when_the_vms_could_write_more_than_is_free() {
        // Plenty for this VM and the others: no warning, however small against 10G.
        assert_eq!(intent(5 * G, 2 * G, &[G, 512 * M]), Verdict::Fine);
        let Verdict::Warn(line) = intent(5 * G, 2 * G, &[3 * G, G + 512 * M]) else {
            panic!("no warning")
        };
        assert!(line.contains("5.0G free"), "{line}");
        assert!(
            line.contains("grow by 2.0G and 2 other VMs' by 4.5G"),
            "{line}"
        );
        // This VM alone could fill it.
        assert!(matches!(intent(3 * G, 4 * G, &[]), Verdict::Warn(_)));
        // A build (no VM disk) is never warned about, only refused below the floor.
        assert_eq!(intent(300 * M, 0, &[20 * G]), Verdict::Fine);
    }

    #[test]
    fn growth_is_size_minus_allocated_never_negative() {
        assert_eq!(growth(10 * G, G), 9 * G);
        assert_eq!(growth(M, 2 * M), 0);
    }

    #[test]
    fn sparse_files_count_only_what_they_can_still_grow() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path();
        for (name, written) in [("a", 0usize), ("b", 4 << 20)] {
            std::fs::create_dir(vms.join(name)).unwrap();
            let f = std::fs::File::create(vms.join(name).join("overlay.img")).unwrap();
            std::io::Write::write_all(&mut &f, &vec![1u8; written]).unwrap();
            f.set_len(64 << 20).unwrap();
            f.sync_all().unwrap();
        }
        std::fs::create_dir(vms.join("new")).unwrap();
        let (_, this, mut others) = vm_figures(vms, &vms.join("new/overlay.img"), 10 * G).unwrap();
        assert_eq!(
            this,
            10 * G,
            "a VM without a disk yet can grow by its whole size"
        );
        others.sort();
        assert_eq!(others.len(), 2);
        assert!(others[0] <= 60 * M && others[0] >= 59 * M, "{others:?}");
        assert_eq!(others[1], 64 * M);
    }
}
