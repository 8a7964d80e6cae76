//! Profiles (SPEC "Profiles", "Image builds"): first-boot setup, images built in real builder
//! VMs, the cache key, and every bad input of the profiles issue.
//!
//! Builds are the expensive part (about two minutes each under TCG), so they are rationed:
//! * one shared image ([`SHARED`], jq) is built once per test binary and reused by every test
//!   that needs an image but not a build of its own;
//! * a test that needs a *previous* image of its own (to see that a failed build keeps it, or
//!   to damage it) starts from a copy of the shared one under its own name. That is sound
//!   because the cache key covers only packages, build, base image and builder version, not
//!   the profile's name: a copy of a matching image is exactly what pen would have built.
//!
//! Profile images live in the images directory every test shares (each test's `PEN_HOME`
//! links to it), under `images/profiles/<profile name>`: tests that build use a name of their
//! own, random per run, and remove its image directory when they pass.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use common::*;

/// A build boots a builder VM, runs apt and packs the whole root: minutes under TCG on a
/// loaded 2-core machine. Generous, so that only a hang fails on time.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The shared profile's name and the part of it that decides the image. Tests add their own
/// `setup` in their own `PEN_HOME/profiles/`; that never changes the image.
const SHARED: &str = "it-jq";
const SHARED_IMAGE: &str = "packages = [\"jq\"]\nbuild = \"jq --version > /etc/pen-it-jq\"\n";

fn write_profile(pen: &Pen, name: &str, text: &str) {
    let dir = pen.home.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

fn image_dir(pen: &Pen, profile: &str) -> PathBuf {
    pen.home.join("images/profiles").join(profile)
}

/// How many builds `text` (pen's stderr) announces for `profile`: pen opens a build with this
/// line (`...`: the start, not the "done" line that closes it) when, and only when, it boots a
/// builder VM for the profile.
fn builds(text: &str, profile: &str) -> usize {
    text.matches(&format!("pen: building profile {profile}'s image..."))
        .count()
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A profile name no earlier run used: its image is built from scratch.
fn unique(prefix: &str) -> String {
    random_token(&format!("{prefix}-"))[..prefix.len() + 9].to_string()
}

/// Leftovers of builds in an image directory: scratch directories of builder VMs.
fn scratch_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".build-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes a test's own profile image directory when the test passes (on failure it stays,
/// with its build.log, for a look).
struct OwnImage(PathBuf);

impl Drop for OwnImage {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Builds the shared image once per test binary, as `pen image build` under `pen`'s home (the
/// caller holds a VM slot: the builder VM counts against it), and writes the shared profile,
/// without a setup, into `pen`'s profiles. A later run finds the image built and reuses it.
fn shared_image(pen: &Pen) {
    static BUILT: OnceLock<()> = OnceLock::new();
    write_profile(pen, SHARED, SHARED_IMAGE);
    BUILT.get_or_init(|| {
        eprintln!("pen-it: building (or reusing) the shared profile image {SHARED}");
        run_cmd(pen.cmd(&["image", "build", SHARED]), None, BUILD_TIMEOUT).ok();
    });
}

/// Copies the shared image to `images/profiles/<to>`, `build.hash` last as pen writes it, so
/// that a profile `to` with the shared packages and build finds its image built. Copies, not
/// hard links: some tests damage the copy in place.
fn copy_shared_image(pen: &Pen, to: &str) {
    let from = image_dir(pen, SHARED);
    let dir = image_dir(pen, to);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["rootfs.sqfs", "image.json", "build.hash"] {
        std::fs::copy(from.join(file), dir.join(file)).unwrap();
    }
}

/// `pen exec NAME --profile PROFILE <test flags> -- CMD...`, allowed a build's time.
fn exec_profile(pen: &Pen, vm: &str, profile: &str, command: &[&str]) -> Out {
    let mut args = pen.create_args("exec", vm, &["--profile", profile]);
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    run_cmd(pen.cmd(&args), None, BUILD_TIMEOUT)
}

/// `pen exec NAME -- CMD...` on an existing VM, after waiting for its previous boot to end:
/// the VM of a finished exec powers off by itself, so this is a second boot.
fn exec_again(pen: &Pen, vm: &str, command: &[&str]) -> Out {
    pen.wait_status(vm, "stopped", Duration::from_secs(120));
    let mut args = vec!["exec".to_string(), vm.to_string(), "--".into()];
    args.extend(command.iter().map(|s| s.to_string()));
    pen.run(&args)
}

#[test]
fn a_profile_image_has_its_packages_and_build_output_baked_in() {
    let pen = Pen::new("prof-image");
    shared_image(&pen);
    // No runtime install: apt's lists are cleaned out of the image, so `apt-get install`
    // could not even find jq; jq, its dpkg record and the build script's output are there.
    let out = exec_profile(
        &pen,
        "jqvm",
        SHARED,
        &[
            "sh",
            "-c",
            "echo '{\"a\":[1,2]}' | jq -c .a && dpkg -s jq | grep -q '^Status: install ok installed' && cat /etc/pen-it-jq && { ls /var/lib/apt/lists | grep -c _Packages || true; }",
        ],
    )
    .ok();
    assert_eq!(builds(&out.stderr, SHARED), 0, "built again:\n{out}");
    let stdout = out.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "[1,2]", "jq works:\n{out}");
    assert!(
        lines[1].starts_with("jq-1."),
        "the build script ran:\n{out}"
    );
    assert_eq!(lines[2], "0", "apt lists were not cleaned:\n{out}");

    // pen list, pen profile list|show, pen image list all know the profile and its image.
    assert_eq!(pen.row("jqvm").unwrap()["profile"], SHARED);
    let show = pen.run(&["profile", "show", SHARED]).ok().stdout_str();
    assert!(show.contains("image:    built "), "{show}");
    assert!(show.contains("vms:      jqvm"), "{show}");
    let list = pen.run(&["profile", "list"]).ok().stdout_str();
    let row = list.lines().find(|l| l.starts_with(SHARED)).unwrap_or("");
    assert!(row.contains("jq") && row.contains(" built "), "{list}");
    let images = pen.run(&["image", "list", "--json"]).ok();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&images.stdout).unwrap();
    let row = rows
        .iter()
        .find(|r| r["name"] == format!("profile/{SHARED}"))
        .unwrap_or_else(|| panic!("no row for the profile image:\n{images}"));
    assert_eq!(row["status"], "built", "{images}");
    assert!(row["size"].as_u64().unwrap() > 1 << 20, "{images}");
}

#[test]
fn a_profile_that_names_a_volume_mounts_it_without_a_rebuild() {
    let pen = Pen::new("prof-volume");
    shared_image(&pen);
    let tools = pen.root.join("tools");
    std::fs::create_dir_all(tools.join("bin")).unwrap();
    std::fs::write(
        tools.join("bin/hello"),
        "#!/bin/sh\necho hello from the volume\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tools.join("bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    pen.run(&[
        "volume",
        "create",
        "tools",
        "--from",
        &tools.to_string_lossy(),
    ])
    .ok();
    // Volumes are not part of the image: the shared image serves a profile that adds them.
    let profile = unique("it-vol");
    let _own = OwnImage(image_dir(&pen, &profile));
    copy_shared_image(&pen, &profile);
    write_profile(
        &pen,
        &profile,
        &format!("{SHARED_IMAGE}volumes = [\"tools:/opt/tools\"]\n"),
    );
    let out = exec_profile(
        &pen,
        "pvol",
        &profile,
        &["sh", "-c", "/opt/tools/bin/hello && jq --version"],
    )
    .ok();
    assert_eq!(builds(&out.stderr, &profile), 0, "built again:\n{out}");
    let stdout = out.stdout_str();
    assert!(stdout.starts_with("hello from the volume\njq-1."), "{out}");
    assert_eq!(
        pen.row("pvol").unwrap()["volumes"],
        serde_json::json!([{"name": "tools", "path": "/opt/tools"}])
    );
}

#[test]
fn setup_runs_once_per_vm_and_an_edit_only_reaches_new_vms() {
    let pen = Pen::new("prof-setup");
    shared_image(&pen);
    let token = random_token("setup-");
    let setup = |version: &str| {
        format!(
            "{SHARED_IMAGE}setup = \"echo {version}-{token}; echo {version} >> /root/setup-runs\"\n"
        )
    };
    write_profile(&pen, SHARED, &setup("v1"));

    // First boot: setup runs, its output reaches the user, the marker is written.
    let out = exec_profile(
        &pen,
        "s1",
        SHARED,
        &[
            "sh",
            "-c",
            "cat /root/setup-runs; test -f /var/lib/pen/setup-done && echo marked",
        ],
    )
    .ok();
    assert_eq!(out.stdout_str(), "v1\nmarked\n", "{out}");
    let seen = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(
        seen.contains(&format!("v1-{token}")),
        "setup output not shown:\n{out}"
    );
    assert_eq!(builds(&out.stderr, SHARED), 0, "{out}");

    // Second boot: no setup.
    let out = exec_again(&pen, "s1", &["cat", "/root/setup-runs"]).ok();
    assert_eq!(out.stdout_str(), "v1\n", "setup ran twice:\n{out}");
    assert!(!out.stderr.contains(&token), "{out}");
    assert!(!out.stderr.contains("setup changed"), "{out}");

    // The setup changes: s1 keeps what its first boot did, and pen says so.
    write_profile(&pen, SHARED, &setup("v2"));
    let out = exec_again(&pen, "s1", &["cat", "/root/setup-runs"]).ok();
    assert_eq!(out.stdout_str(), "v1\n", "the new setup ran on s1:\n{out}");
    assert!(out.stderr.contains("setup changed"), "no notice:\n{out}");
    assert!(!out.stderr.contains(&token), "{out}");
    assert_eq!(
        builds(&out.stderr, SHARED),
        0,
        "a setup change rebuilt:\n{out}"
    );
    pen.wait_status("s1", "stopped", Duration::from_secs(120));

    // A new VM gets the new setup, and no notice.
    let out = exec_profile(&pen, "s2", SHARED, &["cat", "/root/setup-runs"]).ok();
    assert_eq!(out.stdout_str(), "v2\n", "{out}");
    let seen = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(seen.contains(&format!("v2-{token}")), "{out}");
    assert!(!out.stderr.contains("setup changed"), "{out}");
    assert_eq!(builds(&out.stderr, SHARED), 0, "{out}");
}

#[test]
fn a_failed_setup_leaves_no_marker_reports_its_status_and_the_command_still_runs() {
    let pen = Pen::new("prof-setup-fail");
    shared_image(&pen);
    let token = random_token("fail-");
    write_profile(
        &pen,
        SHARED,
        &format!("{SHARED_IMAGE}setup = \"echo {token}; exit 7\"\n"),
    );
    let check = [
        "sh",
        "-c",
        "test -e /var/lib/pen/setup-done || echo unmarked",
    ];
    let out = exec_profile(&pen, "f1", SHARED, &check).ok();
    assert_eq!(out.stdout_str(), "unmarked\n", "{out}");
    let seen = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(seen.contains(&token), "setup output not shown:\n{out}");
    assert!(
        seen.contains("exit status 7"),
        "exit status not reported:\n{out}"
    );

    // No marker, so the next boot tries again.
    let out = exec_again(&pen, "f1", &check).ok();
    assert_eq!(out.stdout_str(), "unmarked\n", "{out}");
    assert!(
        format!("{}{}", out.stdout_str(), out.stderr).contains(&token),
        "a failed setup was not retried on the next boot:\n{out}"
    );
}

#[test]
fn only_packages_and_build_decide_the_image() {
    let pen = Pen::new("prof-cache");
    shared_image(&pen);
    let name = unique("cache");
    let _own = OwnImage(image_dir(&pen, &name));
    copy_shared_image(&pen, &name);
    let dir = image_dir(&pen, &name);
    let (hash, rootfs) = (dir.join("build.hash"), dir.join("rootfs.sqfs"));

    // Same packages and build: same key, no builder VM.
    write_profile(&pen, &name, SHARED_IMAGE);
    let out = run_cmd(pen.cmd(&["image", "build", &name]), None, BUILD_TIMEOUT).ok();
    assert!(out.stdout_str().contains("up to date"), "{out}");
    assert_eq!(builds(&out.stderr, &name), 0, "{out}");

    // setup, [disk] and [vm] change: still no builder VM, on `pen image build` and on use.
    let key = read(&hash);
    let built_at = mtime(&rootfs);
    write_profile(
        &pen,
        &name,
        &format!("{SHARED_IMAGE}setup = \"true\"\n[disk]\nsize = \"3G\"\n[vm]\nmemory = 1024\n"),
    );
    let out = run_cmd(pen.cmd(&["image", "build", &name]), None, BUILD_TIMEOUT).ok();
    assert!(out.stdout_str().contains("up to date"), "{out}");
    assert_eq!(builds(&out.stderr, &name), 0, "{out}");
    // Without --disk-size, so the profile's [disk] size is the one the VM gets.
    pen.vm("disk");
    let ws = pen.ws.to_string_lossy().into_owned();
    let args = [
        "exec",
        "disk",
        "--profile",
        &name,
        "--dir",
        &ws,
        "--cpus",
        "1",
        "--",
        "jq",
        "--version",
    ];
    let out = run_cmd(pen.cmd(&args), None, BUILD_TIMEOUT).ok();
    assert_eq!(
        builds(&out.stderr, &name),
        0,
        "a setup/disk change rebuilt:\n{out}"
    );
    let row = pen.row("disk").unwrap();
    assert_eq!(
        row["disk_size"],
        3u64 << 30,
        "[disk] size not applied: {row}"
    );
    assert_eq!(row["memory_mb"], 1024, "[vm] memory not applied: {row}");
    assert_eq!(read(&hash), key);
    assert_eq!(mtime(&rootfs), built_at, "rootfs.sqfs was rewritten");
    assert!(scratch_dirs(&dir).is_empty());

    // The build script changes: one rebuild.
    let rebuilt = SHARED_IMAGE.replace("pen-it-jq", "pen-it-jq2");
    write_profile(&pen, &name, &rebuilt);
    let out = run_cmd(pen.cmd(&["image", "build", &name]), None, BUILD_TIMEOUT).ok();
    assert_eq!(builds(&out.stderr, &name), 1, "{out}");
    let key2 = read(&hash);
    assert_ne!(key2, key, "build.hash did not change");
    assert_ne!(mtime(&rootfs), built_at, "rootfs.sqfs was not rewritten");
    assert!(read(&dir.join("build.log")).contains("pen-it-jq2"));

    // The packages change: a duplicate does not count (the key is over the sorted set), a
    // new package does.
    write_profile(
        &pen,
        &name,
        &rebuilt.replace("[\"jq\"]", "[\"jq\", \"jq\"]"),
    );
    let out = run_cmd(pen.cmd(&["image", "build", &name]), None, BUILD_TIMEOUT).ok();
    assert_eq!(builds(&out.stderr, &name), 0, "{out}");
    write_profile(
        &pen,
        &name,
        &rebuilt.replace("[\"jq\"]", "[\"tree\", \"jq\"]"),
    );
    let out = run_cmd(pen.cmd(&["image", "build", &name]), None, BUILD_TIMEOUT).ok();
    assert_eq!(builds(&out.stderr, &name), 1, "{out}");
    assert_ne!(read(&hash), key2, "build.hash did not change");
    let show = pen.run(&["profile", "show", &name]).ok().stdout_str();
    assert!(show.contains("image:    built "), "{show}");
    assert!(scratch_dirs(&dir).is_empty());
}

// ---- bad input: no VM needed ----

#[test]
fn a_profile_that_does_not_exist_is_refused_and_the_existing_ones_listed() {
    let pen = Pen::without_vms("prof-missing");
    let ws = pen.ws.to_string_lossy().into_owned();
    pen.run(&["shell", "--profile", "nope", "x", "--dir", &ws])
        .usage_error(&["no profile named \"nope\"", "there are no profiles yet"]);
    write_profile(&pen, "alpha", "packages = []\n");
    write_profile(&pen, "beta", "packages = [\"jq\"]\n");
    let attempts: [&[&str]; 5] = [
        &["shell", "--profile", "nope", "x", "--dir", &ws],
        &["exec", "--profile", "nope", "x", "--dir", &ws, "--", "true"],
        &["start", "--profile", "nope", "x", "--dir", &ws],
        &["image", "build", "nope"],
        &["profile", "show", "nope"],
    ];
    for args in attempts {
        pen.run(args).usage_error(&[
            "no profile named \"nope\"",
            "existing profiles: alpha, beta",
        ]);
    }
    assert!(!pen.home.join("vms/x").exists(), "a VM was created");
    assert!(!pen.home.join("images").exists(), "images were made");
}

#[test]
fn an_invalid_profile_name_is_refused() {
    let pen = Pen::without_vms("prof-badname");
    let ws = pen.ws.to_string_lossy().into_owned();
    for name in ["../x", "A", "a/b", ""] {
        pen.run(&["shell", "--profile", name, "x", "--dir", &ws])
            .usage_error(&["invalid profile name"]);
        pen.run(&["exec", "--profile", name, "x", "--dir", &ws, "--", "true"])
            .usage_error(&["invalid profile name"]);
        pen.run(&["image", "build", name])
            .usage_error(&["invalid profile name"]);
        pen.run(&["profile", "show", name])
            .usage_error(&["invalid profile name"]);
    }
    assert!(!pen.home.join("vms").exists(), "a VM was created");
    assert!(!pen.home.join("images").exists(), "images were made");
}

#[test]
fn a_malformed_profile_names_file_line_and_column() {
    let pen = Pen::without_vms("prof-malformed");
    let ws = pen.ws.to_string_lossy().into_owned();
    let cases = [
        (
            "typo",
            "packages = []\npakages = [\"jq\"]\n",
            ":2:1:",
            "unknown field",
        ),
        ("wrongtype", "packages = \"jq\"\n", ":1:12:", "invalid type"),
        ("cpus", "[vm]\ncpus = \"two\"\n", ":2:8:", "invalid type"),
        (
            "section",
            "[disk]\nsize = \"4G\"\nsise = 1\n",
            ":3:1:",
            "unknown field",
        ),
        (
            "option",
            "packages = [\"jq\", \"-oAPT::x\"]\n",
            ":1:19:",
            "not a Debian package name",
        ),
        ("size", "[disk]\nsize = \"10Q\"\n", ":2:1:", "size"),
    ];
    for (name, text, at, what) in cases {
        write_profile(&pen, name, text);
        let file = pen.home.join("profiles").join(format!("{name}.toml"));
        let located = format!("{}{at}", file.display());
        for args in [
            vec!["shell", "--profile", name, "x", "--dir", &ws],
            vec!["image", "build", name],
            vec!["profile", "show", name],
        ] {
            let out = pen.run(&args).usage_error(&[what]);
            assert!(out.stderr.contains(&located), "expected {located}:\n{out}");
        }
    }
    // `pen profile list` still lists them, each marked invalid.
    let out = pen.run(&["profile", "list"]).ok();
    assert_eq!(
        out.stdout_str().matches("invalid:").count(),
        cases.len(),
        "{out}"
    );
    assert!(!pen.home.join("vms").exists(), "a VM was created");
}

// ---- bad input: failing builds ----

#[test]
fn a_package_that_does_not_exist_fails_the_build_and_keeps_the_previous_image() {
    let pen = Pen::new("prof-badpkg");
    shared_image(&pen);
    let name = unique("badpkg");
    let _own = OwnImage(image_dir(&pen, &name));
    copy_shared_image(&pen, &name);
    let dir = image_dir(&pen, &name);
    let (hash, rootfs) = (dir.join("build.hash"), dir.join("rootfs.sqfs"));
    let (key, built_at) = (read(&hash), mtime(&rootfs));

    write_profile(
        &pen,
        &name,
        &SHARED_IMAGE.replace("[\"jq\"]", "[\"jq\", \"pen-no-such-package\"]"),
    );
    let out = run_cmd(pen.cmd(&["image", "build", &name]), None, BUILD_TIMEOUT);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("install packages"),
        "the step is not named:\n{out}"
    );
    assert!(
        out.stderr
            .contains("Unable to locate package pen-no-such-package"),
        "apt's own message is not shown:\n{out}"
    );
    assert_eq!(read(&hash), key, "build.hash changed");
    assert_eq!(mtime(&rootfs), built_at, "rootfs.sqfs was rewritten");
    assert!(scratch_dirs(&dir).is_empty(), "{:?}", scratch_dirs(&dir));
    assert!(read(&dir.join("build.log")).contains("Unable to locate package"));
    // The kept image is the old profile's, now stale, and still whole.
    let show = pen.run(&["profile", "show", &name]).ok().stdout_str();
    assert!(show.contains("image:    stale"), "{show}");
}

#[test]
fn a_failing_build_script_names_the_step_its_status_and_the_log_tail() {
    let pen = Pen::new("prof-buildfail");
    let name = unique("buildfail");
    let _own = OwnImage(image_dir(&pen, &name));
    let token = random_token("tail-");
    write_profile(
        &pen,
        &name,
        // The second line is what npm prints behind a TLS-intercepting proxy.
        &format!(
            "build = \"\"\"\necho {token}\necho 'npm ERR! code SELF_SIGNED_CERT_IN_CHAIN'\nexit 3\n\"\"\"\n"
        ),
    );
    // Through `pen exec --profile`: the build on first use fails the command, before a VM.
    let out = exec_profile(&pen, "bf", &name, &["true"]);
    assert_ne!(out.code, Some(0), "{out}");
    assert_eq!(builds(&out.stderr, &name), 1, "{out}");
    assert!(
        out.stderr.contains("build script"),
        "the step is not named:\n{out}"
    );
    assert!(out.stderr.contains("exit status 3"), "{out}");
    assert!(
        out.stderr.contains(&token),
        "the log tail is not shown:\n{out}"
    );
    assert!(
        out.stderr.contains("hint: ") && out.stderr.contains("PEN_BUILD_CA_CERTS"),
        "no hint for a TLS failure:\n{out}"
    );
    let dir = image_dir(&pen, &name);
    assert!(!dir.join("rootfs.sqfs").exists(), "an image was written");
    assert!(!dir.join("build.hash").exists(), "build.hash was written");
    assert!(scratch_dirs(&dir).is_empty(), "{:?}", scratch_dirs(&dir));
    assert!(read(&dir.join("build.log")).contains(&token));
    assert!(pen.qemu_pids("bf").is_empty(), "the VM booted");
}

#[test]
fn a_profiles_network_allow_list_applies_to_its_builder_and_names_the_refused_host() {
    let pen = Pen::new("prof-netallow");
    let name = unique("netallow");
    let _own = OwnImage(image_dir(&pen, &name));
    // The builder's apt-get update needs the host's mirror (deb.debian.org here, as in the
    // host's apt sources); the build script fetches a name that is not allowed.
    write_profile(
        &pen,
        &name,
        "build = \"exec 3<>/dev/tcp/example.com/80\"\n[network]\nallow = [\"deb.debian.org\"]\n",
    );
    let out = pen.run(&["image", "build", &name]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("build script"), "{out}");
    assert!(
        out.stderr.contains("hint: the build's network refused")
            && out
                .stderr
                .contains("refused dns example.com: domain not in the allowed list"),
        "the refused host is not named:\n{out}"
    );
    assert!(scratch_dirs(&image_dir(&pen, &name)).is_empty());
}

#[test]
fn damaged_images_are_detected_and_a_second_build_waits_for_the_first() {
    let pen = Pen::new("prof-damaged");
    shared_image(&pen);
    let name = unique("damaged");
    let _own = OwnImage(image_dir(&pen, &name));
    copy_shared_image(&pen, &name);
    write_profile(&pen, &name, SHARED_IMAGE);
    let dir = image_dir(&pen, &name);
    let rootfs = dir.join("rootfs.sqfs");
    let status = || {
        let show = pen.run(&["profile", "show", &name]).ok().stdout_str();
        show.lines()
            .find_map(|l| l.strip_prefix("image:"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert!(status().starts_with("built"));

    // A truncated rootfs.sqfs is damaged...
    let len = std::fs::metadata(&rootfs).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&rootfs)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert!(status().starts_with("damaged"), "{}", status());
    let images = pen.run(&["image", "list"]).ok().stdout_str();
    assert!(images.contains("damaged"), "{images}");

    // ... and two builds at once: the second waits for the first and reuses its image.
    let first = pen.spawn(&["image", "build", &name], None);
    assert!(
        wait_until(Duration::from_secs(120), || !scratch_dirs(&dir).is_empty()),
        "the first build did not start"
    );
    let second = pen.spawn(&["image", "build", &name], None);
    let first = first.wait(BUILD_TIMEOUT).ok();
    let second = second.wait(BUILD_TIMEOUT).ok();
    assert_eq!(builds(&first.stderr, &name), 1, "{first}");
    assert_eq!(builds(&second.stderr, &name), 0, "{second}");
    assert!(
        second.stderr.contains("being built by another pen"),
        "{second}"
    );
    assert!(status().starts_with("built"), "{}", status());
    assert_eq!(
        read(&dir.join("build.log"))
            .matches("pen: step apt-get update: [")
            .count(),
        1
    );

    // A build.hash without its image: detected, and rebuilt on use.
    std::fs::remove_file(&rootfs).unwrap();
    assert!(status().starts_with("damaged"), "{}", status());
    let out = exec_profile(&pen, "dmg", &name, &["jq", "--version"]).ok();
    assert!(out.stderr.contains("damaged or incomplete"), "{out}");
    assert_eq!(builds(&out.stderr, &name), 1, "{out}");
    assert!(out.stdout_str().starts_with("jq-1."), "{out}");
    assert!(status().starts_with("built"), "{}", status());
}

/// Unmounts on drop, whatever happened: a test must not leave a mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_fails_the_build_cleanly_and_keeps_the_previous_image() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("pen-it: SKIPPED a_full_disk_fails_the_build_cleanly: mounting a small tmpfs needs root");
        return;
    }
    let pen = Pen::new("prof-diskfull");
    shared_image(&pen);
    let name = unique("full");
    let dir = image_dir(&pen, &name);
    std::fs::create_dir_all(&dir).unwrap();
    let _own = OwnImage(dir.clone());
    // Room for the previous image and the builder VM's disk (apt's lists, about 25M), not
    // for a second image: the build fails while packing. The builder's own disk must not be
    // the one to fill up: QEMU pauses a VM whose disk write fails for room (werror=enospc),
    // and the build would hang instead of failing.
    let previous = std::fs::metadata(image_dir(&pen, SHARED).join("rootfs.sqfs"))
        .unwrap()
        .len();
    let size = format!("size={}", previous + (64 << 20));
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(size.as_str()),
    )
    .unwrap();
    // Dropped before `_own`: unmounted, then the directory removed.
    let _mount = Mount(dir.clone());
    copy_shared_image(&pen, &name);
    let (hash, rootfs) = (dir.join("build.hash"), dir.join("rootfs.sqfs"));
    let (key, built_at) = (read(&hash), mtime(&rootfs));

    write_profile(
        &pen,
        &name,
        &SHARED_IMAGE.replace("pen-it-jq", "pen-it-full"),
    );
    // A build that hangs on the full disk fails here soon, with the likely cause, instead of
    // at the end of a long timeout.
    // No free-space floor: this test is about the disk filling while the build runs.
    let mut cmd = pen.cmd(&["image", "build", &name]);
    cmd.env("PEN_MIN_FREE", "0");
    let mut build = spawn_cmd(cmd, None);
    let mut full_since = None;
    while build.try_wait().is_none() {
        let st = nix::sys::statvfs::statvfs(&dir).unwrap();
        if st.blocks_available() * st.fragment_size() < 1 << 20 {
            let since = *full_since.get_or_insert_with(std::time::Instant::now);
            assert!(
                since.elapsed() < Duration::from_secs(120),
                "the build hangs on the full disk: QEMU pauses a VM whose disk write fails for \
                 room (werror=enospc, its default) unless the drive says werror=report"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = build.wait(TIMEOUT).fails_with(None, &[]);
    assert!(
        out.stderr.to_lowercase().contains("space"),
        "the error does not say the disk is full:\n{out}"
    );
    assert_eq!(read(&hash), key, "build.hash changed");
    assert_eq!(mtime(&rootfs), built_at, "rootfs.sqfs was rewritten");
    assert!(scratch_dirs(&dir).is_empty(), "{:?}", scratch_dirs(&dir));
    let show = pen.run(&["profile", "show", &name]).ok().stdout_str();
    assert!(
        show.contains("image:    stale"),
        "the previous image is not whole: {show}"
    );
}

#[test]
fn a_bad_build_ca_certs_setting_is_refused_before_any_builder_vm() {
    let pen = Pen::new("prof-bad-ca");
    let name = unique("it-ca");
    write_profile(&pen, &name, "packages = [\"jq\"]\n");
    let no_certs = pen.root.join("notes.crt");
    std::fs::write(&no_certs, "not a certificate\n").unwrap();
    for (value, words) in [
        (
            pen.root.join("missing.pem"),
            ["PEN_BUILD_CA_CERTS", "cannot read it"],
        ),
        (no_certs, ["PEN_BUILD_CA_CERTS", "no PEM certificate"]),
    ] {
        let mut cmd = pen.cmd(&["image", "build", &name]);
        cmd.env("PEN_BUILD_CA_CERTS", &value);
        let out = run_cmd(cmd, None, TIMEOUT).usage_error(&words);
        assert_eq!(builds(&out.stderr, &name), 0, "a builder VM ran:\n{out}");
    }
    assert!(!image_dir(&pen, &name).join("build.hash").exists());
}
