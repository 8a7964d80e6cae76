//! Choosing the accelerator: KVM when it can really run a guest, TCG otherwise.
//!
//! An openable `/dev/kvm` is not enough: some hosts (nested setups, our build machines)
//! expose one whose CPU has no `vmx`/`svm`, and a guest started there hangs right after the
//! kernel decompressor. So KVM needs both the device and the CPU flag.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use pen_core::UsageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accel {
    type Err = UsageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(UsageError::new(format!(
                "invalid accelerator {s:?}: use kvm or tcg"
            ))),
        }
    }
}

/// The accelerator to use and, when KVM was wanted but is not usable, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub accel: Accel,
    /// Set when detection fell back to TCG: the one-line notice for the user.
    pub notice: Option<String>,
}

/// Resolves the accelerator: `--accel` (`cli`), else `PEN_ACCEL`, else [`detect`].
/// A bad `PEN_ACCEL` is a usage error.
pub fn choose(cli: Option<Accel>) -> anyhow::Result<Choice> {
    let from_env = match std::env::var("PEN_ACCEL") {
        Ok(v) if !v.trim().is_empty() => Some(
            v.parse::<Accel>()
                .map_err(|e| UsageError::new(format!("PEN_ACCEL: {e}")))?,
        ),
        _ => None,
    };
    Ok(match cli.or(from_env) {
        Some(accel) => Choice {
            accel,
            notice: None,
        },
        None => detect(),
    })
}

/// KVM iff `/dev/kvm` opens read-write and the CPU advertises `vmx` or `svm`.
pub fn detect() -> Choice {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop);
    decide(device, &cpuinfo)
}

/// How to get KVM when `/dev/kvm` exists but this user may not open it.
pub const KVM_GROUP_FIX: &str = "`sudo usermod -aG kvm $USER`, then log in again";

/// The pure part of [`detect`]. The CPU flag is checked before the device's permissions:
/// joining group `kvm` does not help on a CPU that cannot run KVM guests.
pub fn decide(device: std::io::Result<()>, cpuinfo: &str) -> Choice {
    let reason = match device {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("no /dev/kvm".to_string()),
        _ if !cpu_has_virtualization(cpuinfo) => {
            Some("the CPU shows no vmx or svm flag".to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
            "you may not open /dev/kvm; for KVM: {KVM_GROUP_FIX}"
        )),
        Err(e) => Some(format!("/dev/kvm: {e}")),
        Ok(()) => None,
    };
    match reason {
        None => Choice {
            accel: Accel::Kvm,
            notice: None,
        },
        Some(reason) => Choice {
            accel: Accel::Tcg,
            notice: Some(format!("KVM not usable ({reason}); using TCG (slow)")),
        },
    }
}

/// Whether this user may open `/dev/kvm` read-write: `None` when there is no such device.
pub fn kvm_device_access() -> Option<std::io::Result<()>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        other => Some(other.map(drop)),
    }
}

/// Whether the `flags` line of `/proc/cpuinfo` text contains `vmx` (Intel) or `svm` (AMD).
pub fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse vmx sse2\nbugs\t\t: spectre_v1\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm lm\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor lm\nvmx flags\t: vnmi\n";

    #[test]
    fn cpu_flags() {
        assert!(cpu_has_virtualization(INTEL));
        assert!(cpu_has_virtualization(AMD));
        // "vmx flags" is a separate line on some kernels; only the flags line counts.
        assert!(!cpu_has_virtualization(NONE));
        assert!(!cpu_has_virtualization(""));
        assert!(!cpu_has_virtualization("flags : vmxe svmx\n"));
    }

    #[test]
    fn kvm_needs_device_and_flag() {
        assert_eq!(decide(Ok(()), INTEL).accel, Accel::Kvm);
        assert_eq!(decide(Ok(()), INTEL).notice, None);
        let no_flag = decide(Ok(()), NONE);
        assert_eq!(no_flag.accel, Accel::Tcg);
        assert_eq!(
            no_flag.notice.unwrap(),
            "KVM not usable (the CPU shows no vmx or svm flag); using TCG (slow)"
        );
        let missing = decide(Err(std::io::ErrorKind::NotFound.into()), INTEL);
        assert_eq!(missing.accel, Accel::Tcg);
        assert!(missing.notice.unwrap().contains("no /dev/kvm"));
        let denied = decide(Err(std::io::ErrorKind::PermissionDenied.into()), INTEL);
        assert_eq!(denied.accel, Accel::Tcg);
        let notice = denied.notice.unwrap();
        assert!(notice.contains("usermod -aG kvm"), "{notice}");
        // Group kvm would not help a CPU without the flag: say what would.
        let denied_no_flag = decide(Err(std::io::ErrorKind::PermissionDenied.into()), NONE);
        assert!(denied_no_flag.notice.unwrap().contains("no vmx or svm"));
        let other = decide(Err(std::io::ErrorKind::Other.into()), INTEL);
        assert!(other.notice.unwrap().contains("/dev/kvm:"));
    }

    #[test]
    fn parse_accel() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("TCG".parse::<Accel>().unwrap(), Accel::Tcg);
        let err = "hvf".parse::<Accel>().unwrap_err().to_string();
        assert!(err.contains("kvm or tcg"), "{err}");
    }
}
