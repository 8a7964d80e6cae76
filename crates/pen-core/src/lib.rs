//! pen's data: what things are and where they live. Nothing here starts a process; the
//! runtime (`pen-vm`) boots VMs from this data, builders (`pen-build`) sit on the runtime,
//! and the `pen` binary on top.
//!
//! * [`paths`]: where everything lives (`$PEN_HOME`, runtime sockets).
//! * [`names`], [`size`], [`envspec`]: validation of user input.
//! * [`vm`]: a VM's recorded configuration (`vm.json`), its lock, its status; [`notes`]:
//!   what its supervisor noticed (the host disk filled up), for `pen list`.
//! * [`profile`]: profile files and their image cache key.
//! * [`volume`]: read-only volumes: names, guest paths, volume files and their users.
//! * [`image`]: what an image is: the base image's manifest and files, profile images and
//!   their status.
//! * [`fsutil`]: atomic writes, hashing, file helpers; [`progress`]: spinners for long steps.
//! * [`space`]: the free-space floor and the warning about what VM disks could still write.
//! * [`interrupt`]: what an interrupted `pen` undoes (builder VMs, packers, scratch dirs).

pub mod ca_certs;
pub mod envspec;
pub mod error;
pub mod fsutil;
pub mod image;
pub mod interrupt;
pub mod logfile;
pub mod names;
pub mod notes;
pub mod paths;
pub mod profile;
pub mod progress;
pub mod size;
pub mod space;
pub mod testpoint;
pub mod vm;
pub mod volume;

pub use error::UsageError;

/// pen's version, recorded in images and snapshots.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
