//! Extra CA certificates in VMs (`--ca-certs`, issue 24): behind a TLS-intercepting proxy a
//! VM trusts the person's CA from its first command, after a cold boot and after a snapshot
//! restore, and stops trusting it when it is taken away; the image and its cache key do not
//! change; bad input is refused before anything is created.
//!
//! The VM test needs a host whose HTTPS goes through such a proxy, with its CA in
//! `/usr/local/share/ca-certificates` (this project's CI machines), and an HTTPS URL taken
//! from the host's apt configuration at run time; it says so and skips where either is
//! missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A memory size no other test uses: this test's VM boots cold first, then restores the
/// snapshot that boot saved.
const MEMORY: u32 = 1160;

/// Installing curl with apt under TCG on a loaded machine.
const APT_TIMEOUT: Duration = Duration::from_secs(900);

/// The host's first apt mirror, switched to HTTPS: its suite's `Release` file.
fn https_url_from_host_apt() -> Option<String> {
    let sources = pen_build::sources::host_sources(Path::new("/etc"), None).ok()?;
    let line = sources.lines.first()?;
    let mirror = line
        .split_whitespace()
        .find(|t| t.starts_with("http://") || t.starts_with("https://"))?;
    let rest = mirror.split_once("://")?.1.trim_end_matches('/');
    Some(format!("https://{rest}/dists/{}/Release", sources.suite))
}

/// A base64 line from the middle of the first certificate under `dir`.
fn distinctive_cert_line(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .collect();
    files.sort();
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines[lines.len() / 2].to_string()
}

/// `pen ARGS` without the person's `PEN_CA_CERTS`: the test decides what the VM trusts.
fn run(pen: &Pen, args: &[String], timeout: Duration) -> Out {
    let mut cmd = pen.cmd(args);
    cmd.env_remove("PEN_CA_CERTS");
    run_cmd(cmd, None, timeout)
}

/// `pen exec ca-vm [extra] -- sh -c SCRIPT` with the test's shape.
fn exec(pen: &Pen, extra: &[&str], script: &str, timeout: Duration) -> Out {
    let mut args = pen.shaped_args("exec", "ca-vm", MEMORY, extra);
    args.extend(["--", "sh", "-c", script].map(String::from));
    run(pen, &args, timeout)
}

#[track_caller]
fn last_boot_restored(pen: &Pen) -> bool {
    let log = std::fs::read_to_string(pen.vm_dir("ca-vm").join("supervisor.log")).unwrap();
    log.contains("supervisor: restored snapshot")
}

#[test]
fn a_vm_given_the_proxy_ca_reaches_https_after_cold_boot_and_restore_and_not_without_it() {
    let Some(cas) = host_extra_cas() else {
        println!("skipped: the host has no extra CA in /usr/local/share/ca-certificates");
        return;
    };
    let Some(url) = https_url_from_host_apt() else {
        println!("skipped: no apt mirror in the host's apt configuration to reach over HTTPS");
        return;
    };
    let pen = Pen::new("ca-vm");
    // No snapshot of this shape yet: the first start boots cold (and saves one).
    for snapshot in pen.own_snapshots(MEMORY) {
        std::fs::remove_dir_all(snapshot).unwrap();
    }
    // The base image's root and kernel (its initrd follows pen-init: another test's pen
    // may refresh it meanwhile).
    let image_root = || {
        let text = std::fs::read(pen.home.join("images/base.json")).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&text).unwrap();
        (manifest["rootfs"].clone(), manifest["kernel"].clone())
    };
    let root_before = image_root();
    let cas_arg = cas.to_string_lossy().into_owned();
    let curl = format!("curl -sS -o /dev/null -w '%{{http_code}}\\n' '{url}'");

    // Cold boot (a shape no snapshot exists for yet), with the CA: trusted from the first
    // command, by a freshly installed curl (its own package's CA setup included) and by the
    // variables every session gets.
    let first = exec(
        &pen,
        &["--ca-certs", &cas_arg],
        &format!(
            "echo SSL_CERT_FILE=$SSL_CERT_FILE NODE_EXTRA_CA_CERTS=$NODE_EXTRA_CA_CERTS; \
             apt-get update -qq >/dev/null && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null && {curl}"
        ),
        APT_TIMEOUT,
    );
    assert!(!last_boot_restored(&pen), "the first start was not cold");
    assert_eq!(
        first.code,
        Some(0),
        "HTTPS through the proxy failed:\n{first}"
    );
    let stdout = first.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt",
        "{first}"
    );
    assert!(lines.last().unwrap().starts_with('2'), "{first}");
    pen.wait_status("ca-vm", "stopped", Duration::from_secs(60));

    // The path is recorded: the next start (a restore of the snapshot the cold boot saved)
    // reads the certificates again and sends them after the restore.
    let vm_json = std::fs::read_to_string(pen.vm_dir("ca-vm").join("vm.json")).unwrap();
    assert!(vm_json.contains(&cas_arg), "{vm_json}");
    let again = exec(&pen, &[], &curl, TIMEOUT);
    assert!(last_boot_restored(&pen), "the second start did not restore");
    assert_eq!(again.code, Some(0), "after a restore:\n{again}");
    pen.wait_status("ca-vm", "stopped", Duration::from_secs(60));

    // Taken away: the same VM (curl still installed on its disk) no longer trusts the proxy.
    let without = exec(&pen, &["--ca-certs", "none"], &curl, TIMEOUT);
    assert_eq!(
        without.code,
        Some(60),
        "curl trusted the proxy without the CA:\n{without}"
    );
    let store = exec(
        &pen,
        &[],
        "ls /usr/local/share/ca-certificates; echo SSL_CERT_FILE=$SSL_CERT_FILE",
        TIMEOUT,
    )
    .ok();
    assert_eq!(store.stdout_str(), "SSL_CERT_FILE=\n", "{store}");
    pen.wait_status("ca-vm", "stopped", Duration::from_secs(60));

    // Neither the image nor a snapshot nor anything else under PEN_HOME holds the CA.
    assert_eq!(image_root(), root_before, "the base image changed");
    let line = distinctive_cert_line(&cas);
    let mut holders = files_containing(&pen.home, line.as_bytes());
    holders.extend(files_containing(
        &pen.home.join("images/snapshots"),
        line.as_bytes(),
    ));
    holders.retain(|p| !p.ends_with("overlay.img"));
    assert!(holders.is_empty(), "the CA was written to {holders:?}");
}

#[test]
fn a_profile_image_cache_key_is_the_same_with_and_without_ca_certs() {
    let pen = Pen::new("ca-key");
    let dir = pen.home.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    let certs = pen.root.join("ca.crt");
    std::fs::write(
        &certs,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(dir.join("plain.toml"), "packages = [\"jq\"]\n").unwrap();
    std::fs::write(
        dir.join("proxied.toml"),
        format!("packages = [\"jq\"]\nca_certs = \"{}\"\n", certs.display()),
    )
    .unwrap();
    let key = |name: &str| {
        let out = run(
            &pen,
            &["profile".into(), "show".into(), name.into()],
            TIMEOUT,
        )
        .ok();
        out.stdout_str()
            .lines()
            .find(|l| l.starts_with("image:"))
            .unwrap_or_else(|| panic!("no image line:\n{out}"))
            .to_string()
    };
    let plain = key("plain");
    assert!(plain.contains("will build"), "{plain}");
    assert_eq!(plain, key("proxied"));
}

#[test]
fn bad_ca_certs_are_refused_before_anything_is_created() {
    let pen = Pen::without_vms("ca-bad");
    let not_pem = pen.root.join("notes.crt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let key = pen.root.join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
         -----BEGIN PRIVATE KEY-----\nKKKK\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let missing = pen.root.join("missing.pem");
    for (path, words) in [
        (&missing, ["--ca-certs", "cannot read"]),
        (&not_pem, ["--ca-certs", "no PEM certificate"]),
        (&key, ["--ca-certs", "private key"]),
    ] {
        let path = path.to_string_lossy().into_owned();
        let args = pen.create_args("start", "bad", &["--ca-certs", &path]);
        run(&pen, &args, TIMEOUT).usage_error(&words);
        // The same from PEN_CA_CERTS, which a start reads when the VM records none.
        let mut cmd = pen.cmd(&pen.create_args("start", "bad", &[]));
        cmd.env("PEN_CA_CERTS", &path);
        run_cmd(cmd, None, TIMEOUT).usage_error(&["PEN_CA_CERTS", words[1]]);
        assert!(
            !pen.home.join("vms").join("bad").exists(),
            "a VM was created for {path}"
        );
    }
    // A profile's ca_certs: checked before the VM (or the profile's image) is made.
    let profiles = pen.home.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    for (value, words) in [
        (
            "relative/ca.crt".to_string(),
            ["ca_certs", "not an absolute path"],
        ),
        (
            missing.to_string_lossy().into_owned(),
            ["ca_certs", "cannot read"],
        ),
    ] {
        std::fs::write(
            profiles.join("proxied.toml"),
            format!("packages = []\nca_certs = \"{value}\"\n"),
        )
        .unwrap();
        let args = pen.create_args("start", "bad", &["--profile", "proxied"]);
        run(&pen, &args, TIMEOUT).usage_error(&words);
        assert!(!pen.home.join("vms").join("bad").exists());
        assert!(!pen.home.join("images").exists(), "an image was built");
    }
}

#[test]
fn doctor_warns_about_the_hosts_extra_cas_and_names_the_setting() {
    let Some(cas) = host_extra_cas() else {
        println!("skipped: the host has no extra CA in /usr/local/share/ca-certificates");
        return;
    };
    ensure_image();
    let pen = Pen::without_vms("ca-doctor");
    // The shared base image: its store is what the host's extra CAs are compared with.
    std::os::unix::fs::symlink(it_root().join("images"), pen.home.join("images")).unwrap();
    let line = |ca_env: Option<&Path>| {
        let mut cmd = pen.cmd(&["doctor"]);
        cmd.env_remove("PEN_CA_CERTS");
        if let Some(path) = ca_env {
            cmd.env("PEN_CA_CERTS", path);
        }
        let out = run_cmd(cmd, None, TIMEOUT);
        out.stdout_str()
            .lines()
            .find(|l| l.contains("extra CAs"))
            .unwrap_or_else(|| panic!("no line about extra CAs:\n{out}"))
            .to_string()
    };
    let warned = line(None);
    assert!(warned.starts_with("WARN"), "{warned}");
    for words in ["base image's store lacks", "PEN_CA_CERTS=", "--ca-certs"] {
        assert!(warned.contains(words), "{words:?} missing: {warned}");
    }
    assert!(warned.contains(&*cas.to_string_lossy()), "{warned}");
    let fine = line(Some(&cas));
    assert!(fine.starts_with("ok"), "{fine}");
}
