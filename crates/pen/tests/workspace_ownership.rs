//! `/workspace` from both sides: whatever the guest creates is the invoking user's on the
//! host (with its mode), the user's files are root's in the guest, a `chown` in the guest
//! hands nothing to another host user, and no symlink or `..` the guest makes reaches host
//! content outside the shared directory. The suite runs as an ordinary user in CI, so this
//! is the unprivileged virtiofsd's mapping; as root it is the same mapping onto root.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;

fn me() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

#[test]
fn guest_files_belong_to_the_invoking_user_and_host_files_to_guest_root() {
    let pen = Pen::new("owner");
    std::fs::write(pen.ws.join("from-host.txt"), "host\n").unwrap();
    let script = r#"
        set -e
        cd /workspace
        echo root > by-root.txt
        chmod 640 by-root.txt
        mkdir -m 0777 open-dir
        setpriv --reuid 1000 --regid 1000 --clear-groups \
            sh -c 'echo user > /workspace/open-dir/by-1000.txt'
        echo x > chowned.txt
        chown 1234:1234 chowned.txt || echo "chown refused"
        stat -c '%u:%g' from-host.txt
    "#;
    let out = pen.exec("own", &["bash", "-c", script]).ok();
    assert_eq!(
        out.stdout_str().lines().last(),
        Some("0:0"),
        "a file of the invoking user must be root's in the guest: {out}"
    );
    let (uid, gid) = me();
    for file in [
        "by-root.txt",
        "open-dir/by-1000.txt",
        "chowned.txt",
        "open-dir",
    ] {
        let meta = std::fs::symlink_metadata(pen.ws.join(file)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (uid, gid),
            "{file} made in the guest is not owned by the invoking user ({uid}:{gid}) on the host"
        );
    }
    let mode = std::fs::metadata(pen.ws.join("by-root.txt"))
        .unwrap()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640, "the guest's chmod is kept");
    assert_eq!(
        std::fs::read_to_string(pen.ws.join("open-dir/by-1000.txt")).unwrap(),
        "user\n"
    );
}

#[test]
fn guest_symlinks_and_dotdot_reach_nothing_outside_the_shared_directory() {
    let pen = Pen::new("escape");
    let token = random_token("secret");
    // Host files outside the shared directory: a sibling of it, and one at an absolute path.
    std::fs::write(pen.root.join("outside.txt"), format!("{token}\n")).unwrap();
    let abs = pen.root.join("abs-secret.txt");
    std::fs::write(&abs, format!("{token}\n")).unwrap();
    let script = format!(
        r#"
        cd /workspace
        ln -s ../outside.txt up
        ln -s {abs} abs
        ln -s /etc/shadow shadow
        ln -s .. parent
        cat up abs /workspace/../outside.txt parent/outside.txt 2>&1
        ls -la parent/ 2>&1
        cat shadow 2>&1
        true
    "#,
        abs = abs.display()
    );
    let out = pen.exec("esc", &["bash", "-c", &script]).ok();
    assert!(
        !out.stdout_str().contains(&token) && !out.stderr.contains(&token),
        "guest read host content outside the shared directory:\n{out}"
    );
    // The guest's /etc/shadow is its own, not the host's (compared when the test may read
    // the host's).
    if let Ok(host_shadow) = std::fs::read_to_string("/etc/shadow") {
        let first = host_shadow.lines().next().unwrap_or_default();
        assert!(
            !first.is_empty() && !out.stdout_str().contains(&host_shadow),
            "the guest saw the host's /etc/shadow"
        );
    }
    // The links the guest made are plain symlinks in the shared directory, nothing more.
    let link = std::fs::read_link(pen.ws.join("up")).unwrap();
    assert_eq!(link, std::path::Path::new("../outside.txt"));
}
