//! The example profiles shipped in `examples/profiles/`, built by real builder VMs and booted,
//! exactly as a user would copy them into their profiles directory.
//!
//! `claude.toml` installs Node from Debian and Claude Code from npm: minutes under TCG, and
//! its `npm install` needs HTTPS to the npm registry. Where the host reaches the network
//! through a TLS-intercepting proxy whose CA the host trusts from
//! `/usr/local/share/ca-certificates` (this project's CI machines do), the test hands that
//! directory to the build with `PEN_BUILD_CA_CERTS`, as such a user would.
//!
//! The images are built under their own names (`claude`, `small`) in the images directory
//! the tests share, and kept: a later run on the same machine reuses them, as pen would.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// Installing nodejs and npm (about 500 Debian packages) and Claude Code, then packing a
/// root of several hundred MB: up to ten minutes under TCG on a loaded 2-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/profiles")
        .join(format!("{name}.toml"))
}

/// Copies `examples/profiles/<name>.toml` into the test's profiles directory.
fn install_example(pen: &Pen, name: &str) {
    let dir = pen.home.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(example(name), dir.join(format!("{name}.toml")))
        .unwrap_or_else(|e| panic!("{}: {e}", example(name).display()));
}

/// A base64 line from the middle of the first certificate under `dir`: it occurs in a
/// bundle only if that certificate does.
fn distinctive_cert_line(dir: &std::path::Path) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .collect();
    files.sort();
    let text = std::fs::read_to_string(files.first()?).ok()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines
        .get(lines.len() / 2)
        .filter(|l| l.len() > 40)
        .map(|l| l.to_string())
}

/// `pen exec NAME --profile PROFILE -- sh -c SCRIPT`, allowed a build's time.
fn exec_profile(pen: &Pen, vm: &str, profile: &str, script: &str) -> Out {
    let mut args = pen.create_args("exec", vm, &["--profile", profile]);
    args.extend(["--", "sh", "-c", script].map(String::from));
    let mut cmd = pen.cmd(&args);
    cmd.env_remove("PEN_BUILD_CA_CERTS");
    if let Some(dir) = host_extra_cas() {
        cmd.env("PEN_BUILD_CA_CERTS", dir);
    }
    run_cmd(cmd, None, BUILD_TIMEOUT)
}

#[test]
fn the_claude_example_builds_and_its_tools_run_with_setup_done_once_per_vm() {
    let pen = Pen::new("ex-claude");
    install_example(&pen, "claude");
    let probe = "claude --version && node --version && rg --version | head -n1 && \
                 git config --global init.defaultBranch && test -d /root/.claude && echo setup-ok";
    let first = exec_profile(&pen, "agent1", "claude", probe).ok();
    let lines: Vec<String> = first.stdout_str().lines().map(String::from).collect();
    assert_eq!(lines.len(), 5, "{first}");
    assert!(lines[0].contains("Claude Code"), "claude runs:\n{first}");
    assert!(lines[1].starts_with('v'), "node runs:\n{first}");
    assert!(lines[2].starts_with("ripgrep "), "rg runs:\n{first}");
    assert_eq!(lines[3], "main", "setup ran:\n{first}");
    assert_eq!(lines[4], "setup-ok", "{first}");
    // The image does not keep trusting the build's extra CAs: its bundle holds none of them.
    if let Some(line) = host_extra_cas().and_then(|dir| distinctive_cert_line(&dir)) {
        let bundle = pen
            .run(&[
                "exec",
                "agent1",
                "--",
                "cat",
                "/etc/ssl/certs/ca-certificates.crt",
            ])
            .ok();
        assert!(
            bundle.stdout_str().contains("-----BEGIN CERTIFICATE-----"),
            "{bundle}"
        );
        assert!(
            !bundle.stdout_str().contains(&line),
            "the image's CA bundle kept a build-time CA"
        );
    }

    // A second VM of the profile: the cached image, its own first-boot setup.
    let second = exec_profile(&pen, "agent2", "claude", probe).ok();
    assert!(
        !second.stderr.contains("building profile claude"),
        "the image was built again:\n{second}"
    );
    assert!(
        second.stdout_str().ends_with("main\nsetup-ok\n"),
        "{second}"
    );
    let show = pen.run(&["profile", "show", "claude"]).ok().stdout_str();
    assert!(show.contains("image:    built "), "{show}");
}

#[test]
fn the_small_example_builds_and_boots_with_its_build_output_and_setup() {
    let pen = Pen::new("ex-small");
    install_example(&pen, "small");
    let out = exec_profile(
        &pen,
        "small1",
        "small",
        "jq --version && cat /etc/pen-small-build /root/.config/pen-small-setup",
    )
    .ok();
    let stdout = out.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("jq-1."), "jq runs:\n{out}");
    assert_eq!(lines[1], lines[0], "the build script's output:\n{out}");
    assert_eq!(lines[2], "first boot", "setup ran:\n{out}");
}
