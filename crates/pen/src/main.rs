//! `pen`: a thin command line over the pen libraries: `pen-core` (data), `pen-vm` (the
//! runtime) and `pen-build` (image builders).

mod catalog;
mod cli;
mod commands;
mod doctor;
mod network;

use std::process::ExitCode;

use clap::Parser;
use pen_core::UsageError;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PEN_LOG"))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = cli::Cli::parse();
    if cli.command.only_prints() {
        // `pen list | head` should end quietly like any Unix tool, not panic on a closed
        // stdout. Commands that talk to a supervisor keep Rust's default (ignore), so a
        // socket closing under them is an error they report, not a silent death.
        // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match commands::run(cli.command) {
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
