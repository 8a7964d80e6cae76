//! Boot stages 1 and 2 (SPEC "Guest boot"). Each step is a plain blocking function: during
//! boot nothing else runs on the runtime, and the steps are quick.

pub mod disks;
pub mod modules;
pub mod mounts;
pub mod overlay;
pub mod prefetch;
pub mod system;
pub mod volumes;

use std::fmt;

/// A boot step failed: reported as `pen-init: <stage>: <message>` and as
/// [`pen_proto::Message::BootFailed`], then the VM powers off.
#[derive(Debug, thiserror::Error)]
pub struct BootError {
    pub stage: &'static str,
    pub message: String,
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.message)
    }
}

impl BootError {
    pub fn new(stage: &'static str, message: impl Into<String>) -> Self {
        BootError {
            stage,
            message: message.into(),
        }
    }
}

/// Attaches a stage name to any displayable error.
pub trait StageExt<T> {
    fn stage(self, stage: &'static str) -> Result<T, BootError>;
}

impl<T, E: fmt::Display> StageExt<T> for Result<T, E> {
    fn stage(self, stage: &'static str) -> Result<T, BootError> {
        self.map_err(|e| BootError::new(stage, e.to_string()))
    }
}

/// Where stage 1 mounts things inside the initramfs. None of these paths is reachable from the
/// merged root once stage 1 has chrooted into it.
pub const SYSROOT: &str = "/sysroot";
pub const OVERLAY_MNT: &str = "/overlay";
pub const NEWROOT: &str = "/newroot";
