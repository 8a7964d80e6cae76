//! Kernel modules shipped flat in the initramfs (`/lib/modules/*.ko`), loaded in the order of
//! `/lib/modules/load.list` (dependency order, prepared by the host).

use std::ffi::CStr;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::BootError;

pub const MODULE_DIR: &str = "/lib/modules";

/// Module file names from `load.list`: one per line, blank lines and `#` comments skipped.
/// Names must be plain file names (no `/`), so a bad list cannot load files from elsewhere.
pub fn parse_load_list(text: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('/') || line == "." || line == ".." {
            return Err(format!(
                "load.list line {}: not a file name: {line:?}",
                n + 1
            ));
        }
        names.push(line.to_string());
    }
    Ok(names)
}

/// Loads every module in `dir/load.list`; an already loaded (or built-in) module is fine.
pub fn load_modules(dir: &Path) -> Result<usize, BootError> {
    let list_path = dir.join("load.list");
    let text = match std::fs::read_to_string(&list_path) {
        Ok(t) => t,
        // No list: a kernel with everything built in.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(BootError::new(
                "modules",
                format!("{}: {e}", list_path.display()),
            ))
        }
    };
    let names = parse_load_list(&text).map_err(|e| BootError::new("modules", e))?;
    // The list should be in dependency order. Should it not be, a module whose dependency
    // comes later fails with ENOENT ("unknown symbol"): retry the failures while each pass
    // makes progress, instead of failing the boot over an ordering slip.
    let mut pending: Vec<&String> = names.iter().collect();
    loop {
        let mut failed = Vec::new();
        let mut last_error = None;
        for name in &pending {
            if let Err(e) = load_one(dir, name) {
                failed.push(*name);
                last_error = Some(e);
            }
        }
        match last_error {
            None => return Ok(names.len()),
            Some(e) if failed.len() == pending.len() => return Err(e),
            Some(_) => pending = failed,
        }
    }
}

fn load_one(dir: &Path, name: &str) -> Result<(), BootError> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path)
        .map_err(|e| BootError::new("modules", format!("{}: {e}", path.display())))?;
    let params: &CStr = c"";
    // SAFETY: finit_module reads the module from a valid open fd; params is a valid
    // NUL-terminated string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // EEXIST: already loaded or built in.
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(BootError::new("modules", format!("load {name}: {err}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_list_keeps_order_and_skips_blanks() {
        let list = "virtio.ko\n\n  virtio_ring.ko \n# comment\nfuse.ko";
        assert_eq!(
            parse_load_list(list).unwrap(),
            vec!["virtio.ko", "virtio_ring.ko", "fuse.ko"]
        );
    }

    #[test]
    fn load_list_refuses_paths() {
        assert!(parse_load_list("../etc/passwd\n").is_err());
        assert!(parse_load_list("kernel/fs/fuse.ko\n").is_err());
    }
}
