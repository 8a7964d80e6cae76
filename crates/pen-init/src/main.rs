//! `pen-init`: PID 1 of a pen guest.
//!
//! Stage 1 prepares the initramfs (API mounts, modules, root image) up to the snapshot point,
//! then waits for the host's per-VM [`pen_proto::GuestConfig`]. Stage 2 builds the merged root,
//! configures the VM and finally serves exec sessions (see [`agent`]). PID 1 must never exit
//! or panic into a kernel panic: every failure ends in a message on the console (and to the
//! host when the link is up) followed by a clean power-off.

mod agent;
mod boot;
mod console;
mod credit;
mod env;
mod fdio;
mod link;
mod net;
mod power;
mod pty;
mod reaper;
mod session;
mod space;
mod trust;

use std::time::Instant;

fn main() {
    // First of all, make sure fds 0-2 are the console: a cpio initramfs without /dev/console
    // starts init with them closed, and the first files we open would take their place.
    // On failure there is nothing to print to yet; keep going, later steps report errors.
    let _ = console::setup();
    std::panic::set_hook(Box::new(|info| {
        console::print(&format!("pen-init: panic: {info}"));
        power::power_off();
    }));

    let started = Instant::now();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            console::print(&format!("pen-init: runtime: {e}"));
            power::power_off();
        }
    };
    runtime.block_on(agent::run(started));
    // agent::run only returns after a shutdown was requested and done.
    power::power_off();
}
