//! The pen library. One module per concern; the `pen` binary is a thin CLI over it.
//!
//! * [`paths`]: where everything lives (`$PEN_HOME`, runtime sockets).
//! * [`names`], [`size`], [`envspec`]: validation of user input.
//! * [`vm`]: a VM's recorded configuration (`vm.json`), its lock, its status.
//! * [`profile`]: profile files and their image cache key.
//! * [`image`]: building and listing the base image (kernel, initrd, root squashfs) and
//!   profile images (built in a builder VM).
//! * [`accel`], [`qemu`], [`virtiofsd`]: host capabilities and the processes a VM needs;
//!   [`qmp`] talks to a running QEMU.
//! * [`snapshot`]: saved guest state that starts a VM without a kernel boot.
//! * [`supervisor`]: the per-VM process that owns QEMU, virtiofsd, the lock and the agent link.
//! * [`client`]: `pen shell` / `pen exec` / `pen stop` as clients of a supervisor.
//! * [`doctor`]: host dependency checks; [`progress`]: spinners for long steps;
//!   [`fsutil`]: atomic writes.

pub mod accel;
pub mod client;
pub mod doctor;
pub mod envspec;
pub mod error;
pub mod fsutil;
pub mod image;
pub mod names;
pub mod paths;
pub mod profile;
pub mod progress;
pub mod qemu;
pub mod qmp;
pub mod size;
pub mod snapshot;
pub mod supervisor;
pub mod virtiofsd;
pub mod vm;

pub use error::UsageError;

/// pen's version, recorded in images and snapshots.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
