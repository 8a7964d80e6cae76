//! Read-only volumes (SPEC "Volumes"): a host tree packed once reads the same (names,
//! modes, links, sizes, contents) in several VMs at once, cannot be written, survives
//! re-creation under a running VM, is attached after the snapshot point (a restored VM
//! mounts its own volumes), and `pen volume rm` refuses a volume in use (`--force` takes
//! it from stopped VMs). Bad input is
//! refused with exit 2 before anything is made.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Computes one line per entry (type, path, mode, size, link count, link target) plus the
/// sha256 of every regular file but the big sparse one, sorted, and prints the sha256 of
/// it all and the number of lines. Run by the same `sh` on the host and in the guest.
const MANIFEST: &str = r#"cd "$1" || exit 1
export LC_ALL=C
{
  find . -mindepth 1 -type d -printf 'd %p %m\n'
  find . -mindepth 1 ! -type d -printf '%y %p %m %s %n %l\n'
  find . -type f ! -name big.sparse -print0 | xargs -0 sha256sum
} | sort > /tmp/manifest.$$
echo "$(sha256sum < /tmp/manifest.$$ | cut -d' ' -f1) $(wc -l < /tmp/manifest.$$)"
rm -f /tmp/manifest.$$
"#;

/// Where the sparse file's few written bytes are.
const SPARSE_SIZE: u64 = 300 << 20;
const SPARSE_MIDDLE: u64 = 150 << 20;

/// A tree of 2 000 files in 20 directories with assorted modes, plus symlinks (relative,
/// to a directory, absolute, dangling), a hard link, an empty file, a 300 MB sparse file,
/// names with spaces and UTF-8, a private directory.
fn make_tree(root: &Path) {
    for d in 0..20 {
        let dir = root.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let path = dir.join(format!("f{f:03}"));
            std::fs::write(&path, format!("{d}/{f}\n").repeat(f + 1)).unwrap();
            let mode = [0o644, 0o600, 0o755, 0o444][f % 4];
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let odd = root.join("odd names");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("with space é ü.txt"), "spaces and UTF-8\n").unwrap();
    std::fs::write(odd.join("ünïcødé 名前"), "more UTF-8\n").unwrap();
    std::fs::write(odd.join("-leading dash"), "dash\n").unwrap();
    let links = root.join("links");
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::symlink("../d00/f000", links.join("rel")).unwrap();
    std::os::unix::fs::symlink("../d01", links.join("dir")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", links.join("abs")).unwrap();
    std::os::unix::fs::symlink("nowhere", links.join("dangling")).unwrap();
    std::fs::hard_link(root.join("d02/f000"), links.join("hard")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    let private = root.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("key"), "k\n").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sparse = std::fs::File::create(root.join("big.sparse")).unwrap();
    sparse.set_len(SPARSE_SIZE).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"middle", SPARSE_MIDDLE).unwrap();
    sparse.write_all_at(b"tail", SPARSE_SIZE - 4).unwrap();
}

/// The manifest of `dir` on the host.
fn host_manifest(dir: &Path) -> String {
    let out = Command::new("sh")
        .args(["-c", MANIFEST, "sh"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "host manifest failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `pen exec NAME -- sh -c MANIFEST sh DIR` on a running VM.
fn guest_manifest_args(name: &str, dir: &str) -> Vec<String> {
    ["exec", name, "--", "sh", "-c", MANIFEST, "sh", dir]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn volume_list(pen: &Pen) -> Vec<serde_json::Value> {
    let out = pen.run(&["volume", "list", "--json"]).ok();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

#[test]
fn a_packed_tree_reads_the_same_in_two_vms_at_once_and_cannot_be_written() {
    let pen = Pen::new("vol-tree");
    let tree = pen.root.join("tree");
    make_tree(&tree);
    let tree_arg = tree.to_string_lossy().into_owned();
    let out = pen
        .run(&["volume", "create", "data", "--from", &tree_arg])
        .ok();
    assert!(out.stdout_str().contains("volume data created"), "{out}");
    let listed = volume_list(&pen);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "data");
    // 2 000 files, 23 directories and the root, 11 others; the hard link shares an inode.
    assert!(listed[0]["files"].as_u64().unwrap() > 2000, "{listed:?}");
    // Holes stay holes: 300 MB of sparse file packs into far less.
    let size = listed[0]["size"].as_u64().unwrap();
    assert!(size < 10 << 20, "the volume is {size} bytes");

    let expected = host_manifest(&tree);
    // 23 directories, 2 011 other entries, 2 006 file hashes.
    assert!(
        expected.ends_with(" 4040"),
        "host manifest lines: {expected}"
    );

    pen.run(&pen.create_args("start", "va", &["--volume", "data:/opt/data"]))
        .ok();
    pen.run(&pen.create_args("start", "vb", &["--volume", "data:/srv/data set"]))
        .ok();
    // Both VMs read the one volume at the same time.
    let a = pen.spawn(&guest_manifest_args("va", "/opt/data"), None);
    let b = pen.spawn(&guest_manifest_args("vb", "/srv/data set"), None);
    let (a, b) = (a.wait(TIMEOUT).ok(), b.wait(TIMEOUT).ok());
    assert_eq!(a.stdout_str().trim(), expected, "VM va:\n{a}");
    assert_eq!(b.stdout_str().trim(), expected, "VM vb:\n{b}");

    // The sparse file reads back, holes as zeros and the written bytes where they were.
    let out = pen
        .run(&[
            "exec",
            "va",
            "--",
            "sh",
            "-c",
            &format!(
                "cd /opt/data && stat -c %s big.sparse && head -c 4 big.sparse && echo && \
                 dd if=big.sparse bs=1 skip={SPARSE_MIDDLE} count=6 2>/dev/null && echo && \
                 tail -c 4 big.sparse && echo && dd if=big.sparse bs=1M skip=1 count=1 2>/dev/null | tr -d '\\0' | wc -c"
            ),
        ])
        .ok();
    assert_eq!(
        out.stdout_str(),
        format!("{SPARSE_SIZE}\nhead\nmiddle\ntail\n0\n"),
        "{out}"
    );

    // Read-only: writes fail with EROFS, and the VM carries on.
    let out = pen.run(&[
        "exec",
        "va",
        "--",
        "sh",
        "-c",
        "echo x > /opt/data/new; echo x >> /opt/data/d00/f000; rm /opt/data/empty; \
         mkdir /opt/data/dir; exit 7",
    ]);
    let out = out.code_is(7);
    assert_eq!(
        out.stderr.matches("Read-only file system").count(),
        4,
        "every write should fail with EROFS:\n{out}"
    );
    let out = pen
        .run(&[
            "exec",
            "va",
            "--",
            "sh",
            "-c",
            "grep ' /opt/data ' /proc/mounts; echo ok > /root/after && cat /root/after",
        ])
        .ok();
    let text = out.stdout_str();
    assert!(text.contains("squashfs ro,"), "{out}");
    assert!(text.ends_with("ok\n"), "{out}");

    // pen list shows each VM's volumes.
    assert_eq!(
        pen.row("vb").unwrap()["volumes"],
        serde_json::json!([{"name": "data", "path": "/srv/data set"}])
    );
    let out = pen.run(&["list"]).ok();
    assert!(out.stdout_str().contains(" data "), "{out}");
    let listed = volume_list(&pen);
    let users: Vec<&str> = listed[0]["used_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["vm"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["va", "vb"]);
    for vm in ["va", "vb"] {
        pen.run(&["stop", vm]).ok();
    }
}

/// Writes a one-file tree `dir/version` = `text` and packs it as volume `name`.
fn pack_version(pen: &Pen, name: &str, text: &str) {
    let dir = pen.root.join(format!("src-{name}-{text}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("version"), format!("{text}\n")).unwrap();
    pen.run(&["volume", "create", name, "--from", &dir.to_string_lossy()])
        .ok();
}

#[test]
fn recreating_a_volume_reaches_a_vm_at_its_next_start_and_rm_refuses_one_in_use() {
    let pen = Pen::new("vol-recreate");
    pack_version(&pen, "tool", "one");
    pack_version(&pen, "other", "o");
    let vm = "vr";
    pen.run(&pen.create_args(
        "start",
        vm,
        &["--volume", "tool:/opt/tool", "--volume", "other:/opt/other"],
    ))
    .ok();
    let read = "echo 3 > /proc/sys/vm/drop_caches; cat /opt/tool/version /opt/other/version";
    let out = pen.run(&["exec", vm, "--", "sh", "-c", read]).ok();
    assert_eq!(out.stdout_str(), "one\no\n", "{out}");

    // A new version while the VM runs: the VM keeps the file it opened, even past its
    // page cache; the previous file is gone from the host's directory.
    pack_version(&pen, "tool", "two");
    let out = pen.run(&["exec", vm, "--", "sh", "-c", read]).ok();
    assert_eq!(out.stdout_str(), "one\no\n", "{out}");

    // In use by a running VM: refused, --force or not.
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["volume", "rm", "tool"];
        args.extend(extra);
        pen.run(&args).usage_error(&["tool", "running", vm]);
    }
    assert!(pen.home.join("volumes/tool.sqfs").is_file());

    // The next start sees the new version, and it is a restore from the image's snapshot
    // (the VM's volumes are not part of it).
    pen.run(&["stop", vm]).ok();
    let out = pen
        .run(&[
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            "cat /opt/tool/version /opt/other/version",
        ])
        .ok();
    assert_eq!(out.stdout_str(), "two\no\n", "{out}");
    let log = std::fs::read_to_string(pen.vm_dir(vm).join("supervisor.log")).unwrap();
    assert!(
        log.contains("supervisor: restored snapshot"),
        "the second start should restore the snapshot:\n{log}"
    );
    pen.wait_status(vm, "stopped", Duration::from_secs(120));

    // Configured but stopped: refused without --force.
    pen.run(&["volume", "rm", "tool"])
        .usage_error(&["tool", "used by", vm, "--force"]);
    // --force takes it from the stopped VM, which keeps its other volume and starts.
    let out = pen.run(&["volume", "rm", "tool", "--force"]).ok();
    assert!(
        out.stderr
            .contains("VM(s) vr (/opt/tool) no longer mount volume tool"),
        "{out}"
    );
    assert!(!pen.home.join("volumes/tool.sqfs").exists());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pen.vm_dir(vm).join("vm.json")).unwrap()).unwrap();
    assert_eq!(
        config["volumes"],
        serde_json::json!([{"name": "other", "path": "/opt/other"}])
    );
    let out = pen
        .run(&[
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            "cat /opt/other/version; test -e /opt/tool/version || echo no-tool",
        ])
        .ok();
    assert_eq!(out.stdout_str(), "o\nno-tool\n", "{out}");
    pen.wait_status(vm, "stopped", Duration::from_secs(120));

    // A volume file deleted by hand: the start says which and how to go on, and changes
    // nothing.
    std::fs::remove_file(pen.home.join("volumes/other.sqfs")).unwrap();
    pen.run(&["exec", vm, "--", "true"])
        .usage_error(&["no volume named \"other\"", "--volume none"]);
    // Changing its volumes applies at this start, with a notice.
    pack_version(&pen, "tool", "three");
    let out = pen
        .run(&[
            "exec",
            vm,
            "--volume",
            "tool:/opt/t2",
            "--",
            "sh",
            "-c",
            "cat /opt/t2/version; test -e /opt/other/version || echo no-other",
        ])
        .ok();
    assert_eq!(out.stdout_str(), "three\nno-other\n", "{out}");
    assert!(
        out.stderr
            .contains("VM vr's volumes are now tool:/opt/t2 (were other:/opt/other)"),
        "{out}"
    );
}

#[test]
fn bad_volume_input_is_refused_before_anything_is_made() {
    let pen = Pen::without_vms("vol-bad");
    let ws = pen.ws.to_string_lossy().into_owned();
    let src = pen.root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "f").unwrap();
    let src_arg = src.to_string_lossy().into_owned();
    let no_vms = || {
        let vms: Vec<_> = std::fs::read_dir(pen.home.join("vms"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(vms.is_empty(), "bad input created {vms:?}");
    };
    let no_volumes = || {
        let files: Vec<_> = std::fs::read_dir(pen.home.join("volumes"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(files.is_empty(), "bad input created {files:?}");
    };

    // Volume names.
    for name in ["Models", "../x", "a b", ""] {
        let out = pen
            .run(&["volume", "create", name, "--from", &src_arg])
            .usage_error(&["invalid volume name"]);
        assert!(out.stderr.contains(&format!("{name:?}")), "{out}");
    }
    // Sources.
    let file = src.join("f").to_string_lossy().into_owned();
    pen.run(&["volume", "create", "v", "--from", &file])
        .usage_error(&["--from", &file, "not a directory"]);
    let missing = pen.root.join("missing").to_string_lossy().into_owned();
    pen.run(&["volume", "create", "v", "--from", &missing])
        .usage_error(&[&missing, "no such file"]);
    pen.run(&["volume", "create", "v", "--from-tar", &missing])
        .usage_error(&[&missing, "no such file"]);
    pen.run(&["volume", "create", "v"]).code_is(2);
    no_volumes();
    if nix::unistd::geteuid().is_root() {
        eprintln!("pen-it: unreadable files not tested: running as root, which reads everything");
    } else {
        let locked = pen.root.join("locked");
        std::fs::create_dir_all(locked.join("sub")).unwrap();
        for name in ["a", "b", "c", "d", "e", "f", "g"] {
            let f = locked.join("sub").join(name);
            std::fs::write(&f, "x").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
        }
        pen.run(&["volume", "create", "v", "--from", &locked.to_string_lossy()])
            .usage_error(&["7 path(s) cannot be read", "sub/", "and 2 more"]);
        no_volumes();
    }
    pen.run(&["volume", "rm", "nope"])
        .usage_error(&["no volume named \"nope\""]);

    // --volume at creation: unknown volume, bad guest paths, two on one path, too many.
    pen.run(&["volume", "create", "v", "--from", &src_arg]).ok();
    let exec = |vol: &[&str]| {
        let mut args = vec!["exec", "x", "--dir", &ws];
        for v in vol {
            args.extend(["--volume", v]);
        }
        args.extend(["--", "true"]);
        pen.run(&args)
    };
    exec(&["nope:/opt/n"]).usage_error(&["no volume named \"nope\"", "existing volumes: v"]);
    for path in [
        "opt/v",
        "/opt/../etc",
        "/",
        "/workspace",
        "/workspace/v",
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/tmp/v",
    ] {
        let spec = format!("v:{path}");
        let out = exec(&[&spec]).usage_error(&["--volume"]);
        assert!(out.stderr.contains(&format!("{spec:?}")), "{out}");
    }
    exec(&["v:/opt/a", "v:/opt/a/"]).usage_error(&["two volumes on one path", "/opt/a"]);
    exec(&["Bad:/opt/a"]).usage_error(&["invalid volume name \"Bad\""]);
    exec(&["v"]).usage_error(&["\"v\"", "NAME:/GUEST/PATH"]);
    let many: Vec<String> = (0..9).map(|i| format!("v:/opt/v{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    exec(&many).usage_error(&["9 volumes", "at most 8"]);
    no_vms();

    // A profile's volumes follow the same rules, with the file and line.
    std::fs::create_dir_all(pen.home.join("profiles")).unwrap();
    std::fs::write(
        pen.home.join("profiles/p.toml"),
        "volumes = [\"v:/opt/v\", \"v:/proc/x\"]\n",
    )
    .unwrap();
    pen.run(&["exec", "x", "--dir", &ws, "--profile", "p", "--", "true"])
        .usage_error(&["p.toml:1:", "inside /proc"]);
    no_vms();
    assert_eq!(
        std::fs::read_dir(pen.home.join("volumes")).unwrap().count(),
        1,
        "only volume v"
    );
}

#[test]
fn a_tar_stream_packs_into_a_volume() {
    let pen = Pen::without_vms("vol-tar");
    let src = pen.root.join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    // From stdin, then from a file: a second create replaces the first.
    pen.run_stdin(&["volume", "create", "t", "--from-tar", "-"], &tar.stdout)
        .ok();
    let tar_file: PathBuf = pen.root.join("t.tar");
    std::fs::write(&tar_file, &tar.stdout).unwrap();
    let out = pen
        .run(&[
            "volume",
            "create",
            "t",
            "--from-tar",
            &tar_file.to_string_lossy(),
        ])
        .ok();
    assert!(out.stdout_str().contains("volume t replaced"), "{out}");
    // What went in comes out, mode included (rdsquashfs from squashfs-tools-ng).
    let listing = Command::new("rdsquashfs")
        .args(["-l", "/bin"])
        .arg(pen.home.join("volumes/t.sqfs"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        text.contains("-rwxr-xr-x") && text.contains("tool"),
        "{text}"
    );
    // A stream that is not tar fails and leaves the previous version.
    let before = std::fs::read(pen.home.join("volumes/t.sqfs")).unwrap();
    pen.run_stdin(
        &["volume", "create", "t", "--from-tar", "-"],
        "this is not a tar archive. ".repeat(80).as_bytes(),
    )
    .fails_with(Some(1), &["volume t not changed"]);
    assert_eq!(
        std::fs::read(pen.home.join("volumes/t.sqfs")).unwrap(),
        before
    );
    let leftovers: Vec<_> = std::fs::read_dir(pen.home.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

/// The memory size of the VMs of [`a_snapshot_saved_with_small_volumes_serves_vms_with_bigger_ones`]:
/// part of a snapshot's key, so they have a snapshot of their own.
const SIZES_MEMORY: u32 = 1112;

/// Every guest knows its volume disks by the size of the host's placeholders, probed
/// before the snapshot point, never by the size of the volumes of the VM that happened to
/// save the snapshot: a VM restored with a bigger volume in the same slot reads all of it.
/// (Had the saving VM's files been behind the disks while its guest probed them, the
/// restored guest would see a 6 MB volume through a 4 KB disk, and fail to read it.)
#[test]
fn a_snapshot_saved_with_small_volumes_serves_vms_with_bigger_ones() {
    let pen = Pen::new("vol-sizes");
    // No snapshot of this shape yet: the first VM below boots cold and saves it.
    for snap in pen.own_snapshots(SIZES_MEMORY) {
        std::fs::remove_dir_all(snap).unwrap();
    }
    pack_version(&pen, "small", "s");
    // 6 MB of random bytes: squashfs stores them as they are.
    let big = pen.root.join("src-big");
    std::fs::create_dir_all(&big).unwrap();
    let data = random_bytes(6 << 20);
    std::fs::write(big.join("data"), &data).unwrap();
    pen.run(&["volume", "create", "big", "--from", &big.to_string_lossy()])
        .ok();
    let host_sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));

    let shaped = |name: &str, volumes: &[&str], command: &str| -> Vec<String> {
        let mut extra = Vec::new();
        for v in volumes {
            extra.extend(["--volume", v]);
        }
        extra.extend(["--", "sh", "-c", command]);
        pen.shaped_args("exec", name, SIZES_MEMORY, &extra)
    };
    let saver = "vsave";
    let out = pen
        .run(&shaped(saver, &["small:/opt/s"], "cat /opt/s/version"))
        .ok();
    assert_eq!(out.stdout_str(), "s\n", "{out}");
    pen.wait_status(saver, "stopped", Duration::from_secs(120));
    let log = std::fs::read_to_string(pen.vm_dir(saver).join("supervisor.log")).unwrap();
    assert!(
        log.contains("supervisor: cold boot")
            && log
                .lines()
                .any(|l| l.starts_with("supervisor: snapshot ") && l.ends_with(" saved")),
        "the first VM of its shape should boot cold and save the snapshot:\n{log}"
    );

    let reader = "vread";
    let out = pen
        .run(&shaped(
            reader,
            &["big:/opt/b", "small:/opt/s"],
            "sha256sum /opt/b/data | cut -d' ' -f1; cat /opt/s/version",
        ))
        .ok();
    assert_eq!(out.stdout_str(), format!("{host_sum}\ns\n"), "{out}");
    let log = std::fs::read_to_string(pen.vm_dir(reader).join("supervisor.log")).unwrap();
    assert!(
        log.contains("supervisor: restored snapshot"),
        "the second VM should restore the first one's snapshot:\n{log}"
    );
}
