//! The boot initramfs: `/init` (pen-init) and the kernel modules the boot needs, with
//! `lib/modules/load.list` naming them in dependency order (pen-init has no modprobe).

use std::collections::HashMap;
use std::io::Write;

/// Modules the guest boot needs (everything else it uses is built into Debian's cloud kernel).
pub const BOOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "virtiofs",
    "overlay",
    "squashfs",
];

/// `modules.dep`: module path → the paths it depends on.
pub fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// The module name of a path in modules.dep (`kernel/fs/fuse/virtiofs.ko` → `virtiofs`).
/// Debian spells some with '-' and some with '_'; both are the same module to the kernel.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Paths (relative to the modules directory) of `wanted` and their dependencies, each after
/// the modules it depends on. A wanted module missing from modules.dep is an error: the
/// kernel package changed and the boot would fail in a confusing way later.
pub fn load_order(
    deps: &HashMap<String, Vec<String>>,
    wanted: &[&str],
) -> anyhow::Result<Vec<String>> {
    let by_name: HashMap<String, &String> = deps.keys().map(|p| (module_name(p), p)).collect();
    let mut order = Vec::new();
    fn visit(
        path: &str,
        deps: &HashMap<String, Vec<String>>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if order.iter().any(|p| p == path) || depth > 64 {
            return;
        }
        for dep in deps.get(path).into_iter().flatten() {
            visit(dep, deps, order, depth + 1);
        }
        order.push(path.to_string());
    }
    for name in wanted {
        let path = by_name.get(&name.replace('-', "_")).ok_or_else(|| {
            anyhow::anyhow!("the kernel has no module {name:?} (needed to boot); is this a Debian cloud kernel?")
        })?;
        visit(path, deps, &mut order, 0);
    }
    Ok(order)
}

/// One file of the initramfs.
pub struct InitrdFile {
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// Writes a newc cpio archive with the directories every file needs and `/dev/console`
/// (the kernel opens it for init's stdio before init runs).
pub fn write_cpio<W: Write>(mut out: W, files: &[InitrdFile]) -> std::io::Result<W> {
    let mut ino = 1;
    let mut next_ino = || {
        ino += 1;
        ino
    };
    let mut dirs: Vec<String> = vec!["dev".into()];
    for file in files {
        let mut prefix = String::new();
        for part in file
            .path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !dirs.contains(&prefix) {
                dirs.push(prefix.clone());
            }
        }
    }
    for dir in &dirs {
        out = cpio::newc::Builder::new(dir)
            .ino(next_ino())
            .mode(0o040755)
            .nlink(2)
            .write(out, 0)
            .finish()?;
    }
    out = cpio::newc::Builder::new("dev/console")
        .ino(next_ino())
        .mode(0o020600)
        .nlink(1)
        .rdev_major(5)
        .rdev_minor(1)
        .write(out, 0)
        .finish()?;
    for file in files {
        let mut writer = cpio::newc::Builder::new(&file.path)
            .ino(next_ino())
            .mode(0o100000 | file.mode)
            .nlink(1)
            .write(out, file.contents.len() as u32);
        writer.write_all(&file.contents)?;
        out = writer.finish()?;
    }
    cpio::newc::trailer(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\nkernel/fs/fuse/fuse.ko:\nkernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio_ring.ko:\nkernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n";

    #[test]
    fn dependencies_load_first_and_once() {
        let order = load_order(&parse_modules_dep(DEP), &["virtiofs", "virtio_rng"]).unwrap();
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap();
        assert!(pos("/fuse.ko") < pos("/virtiofs.ko"));
        assert!(pos("/virtio_ring.ko") < pos("/virtio.ko"));
        assert!(pos("/virtio_ring.ko") < pos("/virtiofs.ko"));
        assert_eq!(order.len(), 5);
    }

    #[test]
    fn a_missing_module_is_an_error() {
        let err = load_order(&parse_modules_dep(DEP), &["squashfs"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("squashfs"), "{err}");
    }

    #[test]
    fn cpio_holds_files_dirs_and_console() {
        let files = [InitrdFile {
            path: "lib/modules/load.list".into(),
            mode: 0o644,
            contents: b"a.ko\n".to_vec(),
        }];
        let bytes = write_cpio(Vec::new(), &files).unwrap();
        let mut names = Vec::new();
        let mut rest = &bytes[..];
        loop {
            let reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            names.push(reader.entry().name().to_string());
            rest = reader.finish().unwrap();
        }
        assert_eq!(
            names,
            vec![
                "dev",
                "lib",
                "lib/modules",
                "dev/console",
                "lib/modules/load.list"
            ]
        );
    }
}
