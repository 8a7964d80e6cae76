//! pen's runtime: boots VMs from images and serves their sessions. It reads images (from
//! [`pen_core::image`]) but never makes them; builders (`pen-build`) sit on top of it.
//!
//! * [`accel`], [`qemu`], [`virtiofsd`]: host capabilities and the processes a VM needs;
//!   [`qmp`] talks to a running QEMU.
//! * [`snapshot`]: saved guest state that starts a VM without a kernel boot.
//! * [`supervisor`]: the per-VM process that owns QEMU, virtiofsd, the lock and the agent link.
//! * [`net`]: a VM's recorded network settings checked and turned into pen-net's policy.
//! * [`client`]: `pen shell` / `pen exec` / `pen stop` as clients of a supervisor.

pub mod accel;
pub mod client;
pub mod net;
pub mod qemu;
pub mod qmp;
pub mod snapshot;
pub mod supervisor;
pub mod virtiofsd;
