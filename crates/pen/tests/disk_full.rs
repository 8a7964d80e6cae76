//! A full host disk is visible and harmless: the guest sees a full disk (ENOSPC, nothing
//! hangs), every session and `pen list` say the host disk is full, and an overlay that the
//! kernel marked with errors is repaired (`e2fsck -p`) at the next start.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// `s_state` of the overlay's ext4 superblock (1024 + 58), little endian.
const EXT4_STATE: u64 = 1082;

/// CRC-32C (Castagnoli) as ext4 keeps it: seeded with !0 and not inverted at the end.
fn ext4_crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Sets the "has errors" bit of the overlay's ext4 superblock, as the kernel does when its
/// journal aborts, with the superblock's checksum (`metadata_csum`) made to match.
fn mark_with_errors(overlay: &Path) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(overlay)
        .unwrap();
    let mut sb = vec![0u8; 1024];
    f.seek(SeekFrom::Start(1024)).unwrap();
    f.read_exact(&mut sb).unwrap();
    let state = u16::from_le_bytes([sb[58], sb[59]]) | 2;
    sb[58..60].copy_from_slice(&state.to_le_bytes());
    let crc = ext4_crc32c(&sb[..1020]);
    sb[1020..].copy_from_slice(&crc.to_le_bytes());
    f.seek(SeekFrom::Start(1024)).unwrap();
    f.write_all(&sb).unwrap();
}

fn ext4_state(overlay: &Path) -> u16 {
    let mut f = std::fs::File::open(overlay).unwrap();
    f.seek(SeekFrom::Start(EXT4_STATE)).unwrap();
    let mut b = [0u8; 2];
    f.read_exact(&mut b).unwrap();
    u16::from_le_bytes(b)
}

/// A VM whose overlay file system is marked with errors (as the kernel does when its
/// journal aborts) boots: pen-init repairs it with `e2fsck -p`, and what was written
/// before is there.
#[test]
fn an_overlay_marked_with_errors_is_checked_at_the_next_start() {
    let pen = Pen::new("disk-errors");
    pen.start("chk");
    pen.exec("chk", &["sh", "-c", "echo kept > /root/marker; sync"])
        .ok();
    pen.run(&["stop", "chk"]).ok();
    let overlay = pen.vm_dir("chk").join("overlay.img");
    assert_eq!(
        ext4_state(&overlay) & 2,
        0,
        "a clean stop leaves no error flag"
    );
    mark_with_errors(&overlay);
    pen.start("chk");
    let out = pen.exec("chk", &["cat", "/root/marker"]).ok();
    assert_eq!(out.stdout_str().trim(), "kept");
    let console = std::fs::read_to_string(pen.vm_dir("chk").join("console.log")).unwrap();
    assert!(
        console.contains("e2fsck -p fixed them"),
        "pen-init ran no e2fsck:\n{console}"
    );
    pen.run(&["stop", "chk"]).ok();
    assert_eq!(ext4_state(&overlay) & 2, 0, "e2fsck cleared the error flag");
}

/// VM directories on a 700 MiB tmpfs, a guest that writes 1500 MiB with `conv=fsync`: the
/// writer gets ENOSPC within a bounded time (no hang), the session and `pen list` say that
/// the host disk is full, the overlay stays consistent across a restart after space is
/// freed, and the guest writes again.
#[test]
#[ignore = "needs root: mounts a small tmpfs; run by .ci/run as root"]
fn a_full_host_disk_is_a_full_disk_in_the_guest() {
    let pen = Pen::new("disk-full");
    let vms = pen.home.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=700M,mode=0700", "tmpfs"])
        .arg(&vms)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs on {}", vms.display());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(vms.clone());
    // Taken back later to free space on the host.
    let ballast = vms.join("ballast");
    std::fs::write(&ballast, vec![1u8; 200 << 20]).unwrap();

    pen.start("full");
    pen.exec(
        "full",
        &["sh", "-c", "echo before > /root/before; sync -f /root"],
    )
    .ok();
    let started = Instant::now();
    let out = pen.exec(
        "full",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/root/fill bs=1M count=1500 conv=fsync; echo dd=$?",
        ],
    );
    let took = started.elapsed();
    eprintln!("disk-full: dd took {took:?}:\n{out}");
    let stdout = out.stdout_str();
    let stderr = out.stderr.clone();
    assert!(
        stdout.contains("dd=1"),
        "dd should fail on a full disk:\n{out}"
    );
    assert!(
        stderr.contains("No space left on device"),
        "the writer sees ENOSPC, not an I/O error:\n{out}"
    );
    assert!(
        stderr.contains("the host file system holding VM full's disk"),
        "the session was told the host disk is full:\n{out}"
    );
    let row = pen.row("full").unwrap();
    let notes = row["notes"].as_array().cloned().unwrap_or_default();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap_or("").contains("is full")),
        "pen list --json shows the note: {row}"
    );
    let list = pen.run(&["list"]).ok();
    assert!(list.stderr.contains("is full"), "pen list says it:\n{list}");

    // Space freed on the host, the VM restarted: its file system is consistent, it holds
    // what was synced before, and the guest writes again.
    std::fs::remove_file(&ballast).unwrap();
    pen.exec("full", &["rm", "-f", "/root/fill"]).ok();
    pen.run(&["stop", "full"]).ok();
    assert_eq!(
        ext4_state(&pen.vm_dir("full").join("overlay.img")) & 2,
        0,
        "the overlay was not marked with errors"
    );
    pen.start("full");
    let out = pen
        .exec(
            "full",
            &[
                "sh",
                "-c",
                "cat /root/before; dd if=/dev/zero of=/root/again bs=1M count=50 conv=fsync 2>&1 && echo ok",
            ],
        )
        .ok();
    assert!(out.stdout_str().contains("before"), "{out}");
    assert!(out.stdout_str().contains("ok"), "{out}");
    assert!(took < Duration::from_secs(600), "dd took {took:?} to fail");
    pen.run(&["stop", "full"]).ok();
}
