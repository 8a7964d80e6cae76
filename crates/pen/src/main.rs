//! `pen`: a thin command line over the pen libraries: `pen-core` (data), `pen-vm` (the
//! runtime) and `pen-build` (image builders).

mod ca_certs;
mod catalog;
mod cli;
mod commands;
mod doctor;
mod host_cas;
mod network;
mod volumes;

/// `--env K=V` values out of `/proc/PID/cmdline`, which any user of the host can read: a
/// `pen shell` lives as long as the session. Before anything else, pen re-executes itself
/// without them, handing them over in a memfd whose number travels in [`ENV_FD`]. Only the
/// first milliseconds of the process show them; `--env-from-host K` never puts them in an
/// argv at all.
mod argv_scrub {
    use std::ffi::OsString;
    use std::io::{Read, Seek, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;

    const ENV_FD: &str = "__PEN_ENV_FD";

    /// After the re-exec: the values it handed over. Before it: re-executes (and does not
    /// return) when the command line holds `--env K=V`; an empty list otherwise, or when
    /// the re-exec failed (the values then stay in argv, as before).
    pub fn recover_or_reexec() -> Vec<String> {
        if let Some(fd) = std::env::var_os(ENV_FD) {
            std::env::remove_var(ENV_FD);
            return recover(&fd.to_string_lossy()).unwrap_or_default();
        }
        let args: Vec<OsString> = std::env::args_os().collect();
        let (kept, values) = split(&args);
        if values.is_empty() {
            return Vec::new();
        }
        let _ = reexec(&args[0], &kept[1..], &values);
        Vec::new()
    }

    /// The arguments without `--env K=V` (and `--env=K=V`) of `pen shell|exec|start`, and
    /// the values taken out. Arguments after `--` (an exec'd command's) are left alone.
    pub fn split(args: &[OsString]) -> (Vec<OsString>, Vec<String>) {
        let creates = args
            .get(1)
            .is_some_and(|a| matches!(a.to_str(), Some("shell" | "exec" | "start")));
        if !creates {
            return (args.to_vec(), Vec::new());
        }
        let mut kept = Vec::new();
        let mut values = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            if arg == "--" {
                kept.extend_from_slice(&args[i..]);
                break;
            }
            let value = if arg == "--env" {
                args.get(i + 1)
                    .and_then(|v| v.to_str())
                    .filter(|v| v.contains('='))
            } else {
                arg.to_str()
                    .and_then(|a| a.strip_prefix("--env="))
                    .filter(|v| v.contains('='))
            };
            match value {
                Some(v) => {
                    values.push(v.to_string());
                    i += if arg == "--env" { 2 } else { 1 };
                }
                None => {
                    kept.push(arg.clone());
                    i += 1;
                }
            }
        }
        (kept, values)
    }

    fn reexec(argv0: &OsString, rest: &[OsString], values: &[String]) -> anyhow::Result<()> {
        let fd =
            nix::sys::memfd::memfd_create(c"pen-env", nix::sys::memfd::MemFdCreateFlag::empty())?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&serde_json::to_vec(values)?)?;
        file.rewind()?;
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(argv0)
            .args(rest)
            .env(ENV_FD, file.as_raw_fd().to_string())
            .exec();
        Err(err.into())
    }

    fn recover(fd: &str) -> Option<Vec<String>> {
        let fd: i32 = fd.parse().ok()?;
        // Only a memfd of ours: never read some other descriptor named by the environment.
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        if !link.as_os_str().as_bytes().starts_with(b"/memfd:pen-env") {
            return None;
        }
        // SAFETY: the descriptor is the memfd our pre-exec self left open for us; nothing
        // else in this process knows it.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut json = Vec::new();
        file.read_to_end(&mut json).ok()?;
        serde_json::from_slice(&json).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn os(args: &[&str]) -> Vec<OsString> {
            args.iter().map(OsString::from).collect()
        }

        #[test]
        fn env_values_leave_the_command_line() {
            let (kept, values) = split(&os(&[
                "pen",
                "exec",
                "vm",
                "--env",
                "A=1",
                "--env=B=2=3",
                "--env",
                "NOEQ",
                "--cpus",
                "1",
                "--",
                "sh",
                "--env",
                "C=4",
            ]));
            assert_eq!(
                kept,
                os(&[
                    "pen", "exec", "vm", "--env", "NOEQ", "--cpus", "1", "--", "sh", "--env", "C=4"
                ])
            );
            assert_eq!(values, ["A=1", "B=2=3"]);
            // Other commands have no --env: clap must see it and refuse it.
            let args = os(&["pen", "stop", "vm", "--env", "A=1"]);
            assert_eq!(split(&args), (args.clone(), vec![]));
        }
    }
}

use std::process::ExitCode;

use clap::Parser;
use pen_core::UsageError;

fn main() -> ExitCode {
    // Everything pen and its children (the supervisor, QEMU, virtiofsd, tar2sqfs) create is
    // private to the user, whatever umask the shell had: VM disks, logs, images, snapshots.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let env_values = argv_scrub::recover_or_reexec();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PEN_LOG"))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let mut cli = cli::Cli::parse();
    if let cli::Command::Shell { create, .. }
    | cli::Command::Exec { create, .. }
    | cli::Command::Start { create, .. } = &mut cli.command
    {
        create.env.extend(env_values);
    }
    if cli.command.only_prints() {
        // `pen list | head` should end quietly like any Unix tool, not panic on a closed
        // stdout. Commands that talk to a supervisor keep Rust's default (ignore), so a
        // socket closing under them is an error they report, not a silent death.
        // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // SIGINT, SIGTERM or SIGHUP during an image build tears the build down (builder VM,
    // packer, scratch directories) and exits 128+N; see `pen_core::interrupt`.
    pen_core::interrupt::enable();
    let result = commands::run(cli.command);
    // Whatever failed because of the teardown is no news; it ends the process.
    pen_core::interrupt::park_if_interrupted();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            let usage = err.downcast_ref::<UsageError>().is_some();
            // One line for usage errors; the cause chain for the rest.
            if usage {
                eprintln!("pen: {err}");
                ExitCode::from(2)
            } else {
                eprintln!("pen: {err:#}");
                ExitCode::from(1)
            }
        }
    }
}
