//! A VM's recorded configuration (`vms/<name>/vm.json`), its lock and its status.
//!
//! `vm.json` holds what was chosen when the VM was created; it never holds env values.
//! `lock` is held (flock, exclusive) by the VM's supervisor for as long as QEMU may run, with
//! the supervisor's pid inside: it is what guarantees one QEMU per overlay disk.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::paths::{PenHome, VmPaths};
use crate::volume::VolumeMount;

/// What `vm.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    /// Absolute path of the host directory shared at /workspace.
    pub dir: PathBuf,
    pub cpus: u32,
    pub memory_mb: u32,
    /// Size of the overlay disk in bytes; fixed at creation.
    pub disk_size: u64,
    pub profile: Option<String>,
    /// sha256 of the profile's `setup` script when the VM was created.
    #[serde(default)]
    pub setup_hash: Option<String>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// The guest network's policy and published ports. Absent in vm.json files written
    /// before pen had a network policy: those VMs were `open`, pen's default then.
    #[serde(default = "NetworkSettings::recorded_before_public")]
    pub network: NetworkSettings,
    /// Read-only volumes mounted at each start, in order (at most
    /// [`crate::volume::MAX_VOLUMES`]).
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Extra CA certificates the VM trusts (`--ca-certs`, a profile's `ca_certs`): the path
    /// on the host, absolute, read at each start (see [`crate::ca_certs`]); never a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certs: Option<PathBuf>,
}

/// A VM's network settings as recorded: plain strings, checked by pen-net's parsers where
/// they enter (the CLI, before anything is created) and where they are used (the
/// supervisor). pen-core is the data layer and does not depend on pen-net.
///
/// Fields missing from a vm.json take the values of a file written before `public`
/// existed ([`NetworkSettings::recorded_before_public`]): `open`, not chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default = "NetworkSettings::recorded_before_public")]
pub struct NetworkSettings {
    /// `public`, `open`, `none` or `allow`.
    pub mode: String,
    /// Whether `mode` was chosen (`--network`, a profile's `[network]`) rather than taken
    /// from pen's default when the VM was created. A VM that got `open` only as the old
    /// default becomes `public` at its next start ([`resolve_config`]); a chosen `open`
    /// stays. False in files written before this field existed.
    pub mode_chosen: bool,
    /// Domain patterns for mode `allow` (`api.example.com`, `*.example.org`).
    pub allow: Vec<String>,
    /// Exact `ADDR:PORT` host destinations reachable in every mode (`--allow-host`).
    pub allow_hosts: Vec<String>,
    /// Internal ranges reachable in every mode (`--allow-net`, `10.20.0.0/16`).
    pub allow_nets: Vec<String>,
    /// `--publish` specs, `[HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp]`.
    pub publish: Vec<String>,
}

/// A new VM's network when nothing is chosen: `public`.
impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            mode: NETWORK_PUBLIC.to_string(),
            ..NetworkSettings::recorded_before_public()
        }
    }
}

/// The internet only: the private and special-purpose ranges are refused. The default.
pub const NETWORK_PUBLIC: &str = "public";
pub const NETWORK_OPEN: &str = "open";
pub const NETWORK_NONE: &str = "none";
pub const NETWORK_ALLOW: &str = "allow";

impl NetworkSettings {
    /// What a vm.json written before mode `public` existed meant by a missing network (or
    /// missing fields): `open`, pen's default then, not chosen.
    pub fn recorded_before_public() -> Self {
        NetworkSettings {
            mode: NETWORK_OPEN.to_string(),
            mode_chosen: false,
            allow: Vec::new(),
            allow_hosts: Vec::new(),
            allow_nets: Vec::new(),
            publish: Vec::new(),
        }
    }

    /// The mode as `--network` spells it: `open`, `none`, `allow=a.example,b.example`.
    pub fn mode_text(&self) -> String {
        if self.mode == NETWORK_ALLOW {
            format!("allow={}", self.allow.join(","))
        } else {
            self.mode.clone()
        }
    }

    /// One line for `pen list`: the mode, then `+N host(s)`, `+N net(s)` and `+N port(s)`
    /// when set.
    pub fn summary(&self) -> String {
        let mut s = self.mode_text();
        if !self.allow_hosts.is_empty() {
            s.push_str(&format!(" +{}host", self.allow_hosts.len()));
        }
        if !self.allow_nets.is_empty() {
            s.push_str(&format!(" +{}net", self.allow_nets.len()));
        }
        if !self.publish.is_empty() {
            s.push_str(&format!(" +{}port", self.publish.len()));
        }
        s
    }
}

impl VmConfig {
    pub fn load(paths: &VmPaths) -> anyhow::Result<Option<VmConfig>> {
        let path = paths.config();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| {
                    format!(
                        "{} is damaged; fix it or `pen delete` the VM",
                        path.display()
                    )
                })
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, paths: &VmPaths) -> anyhow::Result<()> {
        let mut json = serde_json::to_vec_pretty(self)?;
        json.push(b'\n');
        write_atomic(&paths.config(), &json)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// "5s", "3m", "2h", "4d" ago, for listings.
pub fn age(since_secs: u64) -> String {
    let secs = now_secs().saturating_sub(since_secs);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Running => "running",
            Status::Stopped => "stopped",
        })
    }
}

/// The exclusive lock a supervisor holds while its VM may run. Dropping it releases it.
#[derive(Debug)]
pub struct VmLock {
    _lock: Flock<File>,
}

impl VmLock {
    /// Takes the lock and writes our pid into it. `Ok(None)` when another process holds it.
    /// Retries briefly, because [`status`] probes the lock for an instant.
    pub fn try_acquire(paths: &VmPaths) -> anyhow::Result<Option<VmLock>> {
        for _ in 0..20 {
            let file = open_lock_file(&paths.lock())?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    lock.set_len(0)?;
                    lock.rewind()?;
                    writeln!(lock, "{}", std::process::id())?;
                    lock.sync_all()?;
                    return Ok(Some(VmLock { _lock: lock }));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err((_, e)) => return Err(e).context("locking the VM"),
            }
        }
        Ok(None)
    }
}

/// Opens (creates) the lock file, 0600: a process of another user that could open it
/// could hold a lock on it and wedge the VM. One made by an older pen is tightened.
fn open_lock_file(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", path.display()))?;
    }
    Ok(file)
}

/// Running (with the supervisor's pid) or stopped. Probes the lock without disturbing it.
pub fn status(paths: &VmPaths) -> (Status, Option<u32>) {
    let Ok(mut file) = std::fs::File::open(paths.lock()) else {
        return (Status::Stopped, None);
    };
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let pid = text.trim().parse().ok();
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_probe) => (Status::Stopped, None),
        Err(_) => (Status::Running, pid),
    }
}

/// The pid a supervisor wrote into the VM's lock file, if any.
pub fn lock_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(paths.lock())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live pen supervisor of VM `name` of the pen home `home`, as the
/// pid in its lock claims: a process of ours whose command line is `pen __supervise NAME`
/// with `PEN_HOME=home` in its environment, started before the lock file was written (a
/// later process that reused the pid is not it). Before signalling a pid from the lock
/// file, or concluding that nobody but a supervisor holds the lock.
pub fn is_supervisor(paths: &VmPaths, pid: u32, home: &Path, name: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(meta) = std::fs::metadata(&proc) else {
        return false;
    };
    if pid == 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
        return false;
    }
    let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
    let environ = std::fs::read(proc.join("environ")).unwrap_or_default();
    if !looks_like_supervisor(&cmdline, &environ, home, name) {
        return false;
    }
    match (
        process_start(pid),
        std::fs::metadata(paths.lock()).and_then(|m| m.modified()),
    ) {
        (Some(started), Ok(written)) => started_before(started, written),
        _ => false,
    }
}

/// `pen __supervise NAME` with `PEN_HOME=home`, from /proc's NUL-separated lists.
fn looks_like_supervisor(cmdline: &[u8], environ: &[u8], home: &Path, name: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let mut want = b"PEN_HOME=".to_vec();
    want.extend_from_slice(home.as_os_str().as_encoded_bytes());
    args.len() >= 3
        && args[1] == b"__supervise"
        && args[2] == name.as_bytes()
        && environ.split(|b| *b == 0).any(|e| e == want.as_slice())
}

/// A supervisor writes the lock after it starts. /proc gives start times to the clock tick
/// on top of a boot time in whole seconds: allow 2 s.
fn started_before(started: SystemTime, lock_written: SystemTime) -> bool {
    started <= lock_written + std::time::Duration::from_secs(2)
}

/// When process `pid` started (from /proc/PID/stat's start time and /proc/stat's btime).
fn process_start(pid: u32) -> Option<SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses): field 22,
    // the start time in clock ticks since boot, is the 20th.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let since_boot = std::time::Duration::from_millis(ticks * 1000 / hz as u64);
    Some(UNIX_EPOCH + std::time::Duration::from_secs(btime) + since_boot)
}

/// Names of all VMs that have a `vm.json`, sorted.
pub fn list_names(home: &PenHome) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    match std::fs::read_dir(home.vms()) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if entry.path().join("vm.json").exists() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("listing VMs"),
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> VmConfig {
        VmConfig {
            name: name.into(),
            dir: "/src/x".into(),
            cpus: 2,
            memory_mb: 2048,
            disk_size: 10 << 30,
            profile: None,
            setup_hash: None,
            created_at: 1,
            network: NetworkSettings::default(),
            volumes: Vec::new(),
            ca_certs: None,
        }
    }

    #[test]
    fn config_roundtrips_and_lists() {
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        let paths = VmPaths::new(&home, "dev");
        assert!(VmConfig::load(&paths).unwrap().is_none());
        sample("dev").save(&paths).unwrap();
        assert_eq!(VmConfig::load(&paths).unwrap().unwrap(), sample("dev"));
        assert_eq!(list_names(&home).unwrap(), vec!["dev".to_string()]);
    }

    #[test]
    fn damaged_config_is_an_error_naming_the_file() {
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        let paths = VmPaths::new(&home, "dev");
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(paths.config(), b"{").unwrap();
        let err = format!("{:#}", VmConfig::load(&paths).unwrap_err());
        assert!(err.contains("vm.json is damaged"), "{err}");
    }

    #[test]
    fn supervisor_identity_check() {
        let home = Path::new("/h/pen");
        let cmd = b"/usr/bin/pen\0__supervise\0dev\0";
        let env = b"PATH=/bin\0PEN_HOME=/h/pen\0";
        assert!(looks_like_supervisor(cmd, env, home, "dev"));
        // Another VM, another PEN_HOME, another program: not it.
        assert!(!looks_like_supervisor(cmd, env, home, "dev2"));
        assert!(!looks_like_supervisor(
            cmd,
            b"PEN_HOME=/h/pen2\0",
            home,
            "dev"
        ));
        assert!(!looks_like_supervisor(
            b"sleep\0infinity\0",
            env,
            home,
            "dev"
        ));
        assert!(!looks_like_supervisor(
            b"sh\0-c\0__supervise\0dev\0",
            env,
            home,
            "dev"
        ));

        // A pid reused after the lock was written started after it.
        let written = UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let secs = std::time::Duration::from_secs;
        assert!(started_before(written - secs(60), written));
        assert!(started_before(written + secs(1), written));
        assert!(!started_before(written + secs(60), written));

        // This test process: started in the past, and not a supervisor.
        let me = std::process::id();
        let started = process_start(me).expect("our own start time");
        assert!(started <= SystemTime::now() + secs(2));
        assert!(started > SystemTime::now() - secs(24 * 3600 * 365));
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        let paths = VmPaths::new(&home, "dev");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let _lock = VmLock::try_acquire(&paths).unwrap().unwrap();
        assert_eq!(lock_pid(&paths), Some(me));
        assert!(!is_supervisor(&paths, me, home.root(), "dev"));
        assert!(!is_supervisor(&paths, u32::MAX, home.root(), "dev"));
    }

    #[test]
    fn lock_file_is_private_even_when_made_before() {
        use std::os::unix::fs::PermissionsExt;
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        let paths = VmPaths::new(&home, "dev");
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(paths.lock(), b"").unwrap();
        std::fs::set_permissions(paths.lock(), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(VmLock::try_acquire(&paths).unwrap().unwrap());
        let mode = std::fs::metadata(paths.lock())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn lock_is_exclusive_and_status_sees_it() {
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        let paths = VmPaths::new(&home, "dev");
        std::fs::create_dir_all(&paths.dir).unwrap();
        assert_eq!(status(&paths).0, Status::Stopped);
        let lock = VmLock::try_acquire(&paths).unwrap().expect("first lock");
        assert_eq!(status(&paths), (Status::Running, Some(std::process::id())));
        assert!(VmLock::try_acquire(&paths).unwrap().is_none());
        drop(lock);
        assert_eq!(status(&paths).0, Status::Stopped);
        assert!(VmLock::try_acquire(&paths).unwrap().is_some());
    }
}

/// Creation flags from `pen shell|exec|start`, already parsed and validated.
#[derive(Debug, Clone, Default)]
pub struct CreationFlags {
    /// Absolute, existing directory.
    pub dir: Option<PathBuf>,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub disk_size: Option<u64>,
    pub profile: Option<String>,
    /// `--network`: (mode, allowed domains), validated.
    pub network_mode: Option<(String, Vec<String>)>,
    /// `--allow-host` values when any was given (they replace the recorded list).
    pub allow_hosts: Option<Vec<String>>,
    /// `--allow-net` values when any was given (they replace the recorded list; checked).
    pub allow_nets: Option<Vec<String>>,
    /// `--publish` values when any was given (they replace the recorded list).
    pub publish: Option<Vec<String>>,
    /// `--volume` values when any was given (they replace the recorded list; checked).
    pub volumes: Option<Vec<VolumeMount>>,
    /// `--ca-certs`: `Some(None)` for `none` (clears the record); absolute and checked.
    pub ca_certs: Option<Option<PathBuf>>,
}

pub const DEFAULT_MEMORY_MB: u32 = 2048;
pub const MIN_MEMORY_MB: u32 = 128;
pub const DEFAULT_DISK_SIZE: u64 = 10 << 30;

/// The configuration to record for `name`, and notices for the user. A new VM takes the
/// flags or the defaults. An existing one keeps its disk size (fixed at creation); a stopped
/// one takes new cpus/memory/dir, a running one cannot change and says so.
pub fn resolve_config(
    name: &str,
    existing: Option<VmConfig>,
    flags: &CreationFlags,
    running: bool,
    default_dir: &Path,
) -> (VmConfig, Vec<String>) {
    let mut notices = Vec::new();
    let Some(mut vm) = existing else {
        let vm = VmConfig {
            name: name.to_string(),
            dir: flags
                .dir
                .clone()
                .unwrap_or_else(|| default_dir.to_path_buf()),
            cpus: flags.cpus.unwrap_or_else(host_cpus),
            memory_mb: flags.memory_mb.unwrap_or(DEFAULT_MEMORY_MB),
            disk_size: flags.disk_size.unwrap_or(DEFAULT_DISK_SIZE),
            profile: flags.profile.clone(),
            setup_hash: None,
            created_at: now_secs(),
            network: network_from_flags(NetworkSettings::default(), flags),
            volumes: flags.volumes.clone().unwrap_or_default(),
            ca_certs: flags.ca_certs.clone().flatten(),
        };
        return (vm, notices);
    };
    if flags.disk_size.is_some_and(|size| size != vm.disk_size) {
        notices.push(format!(
            "--disk-size ignored: VM {name}'s overlay disk was created with {}; delete the VM to change it",
            crate::size::human(vm.disk_size)
        ));
    }
    let mut changes = Vec::new();
    if let Some(cpus) = flags.cpus.filter(|c| *c != vm.cpus) {
        changes.push("--cpus");
        if !running {
            vm.cpus = cpus;
        }
    }
    if let Some(memory) = flags.memory_mb.filter(|m| *m != vm.memory_mb) {
        changes.push("--memory");
        if !running {
            vm.memory_mb = memory;
        }
    }
    if let Some(dir) = flags.dir.as_ref().filter(|d| **d != vm.dir) {
        changes.push("--dir");
        if !running {
            vm.dir = dir.clone();
        }
    }
    let mut recorded = vm.network.clone();
    let old_default =
        recorded.mode == NETWORK_OPEN && !recorded.mode_chosen && flags.network_mode.is_none();
    if old_default && !running {
        // `open` only because it was the default when the VM was created: the default is
        // `public` now, so the LAN closes. Said once: the new mode is saved at this start.
        recorded.mode = NETWORK_PUBLIC.to_string();
        notices.push(format!(
            "VM {name}'s network is now public (the internet, not the LAN: pen's new default) instead of open; to keep open, start it with --network open"
        ));
        vm.network = recorded.clone();
    }
    let network = network_from_flags(recorded, flags);
    if network != vm.network {
        // `--network open` given to a VM that has it as the old default: nothing changes
        // but the record that it is now chosen.
        let only_chosen = NetworkSettings {
            mode_chosen: vm.network.mode_chosen,
            ..network.clone()
        } == vm.network;
        if running || !only_chosen {
            changes.push("--network/--allow-host/--allow-net/--publish");
        }
        if !running {
            if !only_chosen {
                notices.push(format!(
                    "VM {name}'s network is now {} (was {})",
                    describe_network(&network),
                    describe_network(&vm.network)
                ));
            }
            vm.network = network;
        }
    }
    if let Some(volumes) = flags.volumes.as_ref().filter(|v| **v != vm.volumes) {
        changes.push("--volume");
        if !running {
            notices.push(format!(
                "VM {name}'s volumes are now {} (were {})",
                describe_volumes(volumes),
                describe_volumes(&vm.volumes)
            ));
            vm.volumes = volumes.clone();
        }
    }
    if let Some(ca_certs) = flags.ca_certs.as_ref().filter(|c| **c != vm.ca_certs) {
        changes.push("--ca-certs");
        if !running {
            let describe = |c: &Option<PathBuf>| match c {
                Some(path) => path.display().to_string(),
                None => "none".to_string(),
            };
            notices.push(format!(
                "VM {name}'s extra CA certificates are now {} (were {})",
                describe(ca_certs),
                describe(&vm.ca_certs)
            ));
            vm.ca_certs = ca_certs.clone();
        }
    }
    if running && !changes.is_empty() {
        notices.push(format!(
            "{} ignored: VM {name} is running; stop it first (`pen stop {name}`) to change it",
            changes.join(", ")
        ));
    }
    (vm, notices)
}

/// `base` with the network flags that were given applied.
fn network_from_flags(mut base: NetworkSettings, flags: &CreationFlags) -> NetworkSettings {
    if let Some((mode, allow)) = &flags.network_mode {
        base.mode = mode.clone();
        base.mode_chosen = true;
        base.allow = allow.clone();
    }
    if let Some(hosts) = &flags.allow_hosts {
        base.allow_hosts = hosts.clone();
    }
    if let Some(nets) = &flags.allow_nets {
        base.allow_nets = nets.clone();
    }
    if let Some(publish) = &flags.publish {
        base.publish = publish.clone();
    }
    base
}

/// `allow=a.example (allow-host 127.0.0.1:8080; allow-net 10.20.0.0/16; publish 8080:80)`,
/// for notices.
pub fn describe_network(n: &NetworkSettings) -> String {
    let mut extra = Vec::new();
    if !n.allow_hosts.is_empty() {
        extra.push(format!("allow-host {}", n.allow_hosts.join(" ")));
    }
    if !n.allow_nets.is_empty() {
        extra.push(format!("allow-net {}", n.allow_nets.join(" ")));
    }
    if !n.publish.is_empty() {
        extra.push(format!("publish {}", n.publish.join(" ")));
    }
    if extra.is_empty() {
        n.mode_text()
    } else {
        format!("{} ({})", n.mode_text(), extra.join("; "))
    }
}

/// `models:/opt/models, jdk:/opt/jdk`, or `none`, for notices.
pub fn describe_volumes(volumes: &[VolumeMount]) -> String {
    if volumes.is_empty() {
        return "none".into();
    }
    volumes
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    fn existing() -> VmConfig {
        VmConfig {
            name: "dev".into(),
            dir: "/src/a".into(),
            cpus: 2,
            memory_mb: 1024,
            disk_size: 10 << 30,
            profile: None,
            setup_hash: None,
            created_at: 1,
            network: NetworkSettings::default(),
            volumes: Vec::new(),
            ca_certs: None,
        }
    }

    #[test]
    fn ca_certs_are_recorded_replaced_and_cleared_but_not_while_running() {
        let set = CreationFlags {
            ca_certs: Some(Some("/etc/proxy-ca".into())),
            ..Default::default()
        };
        let (vm, _) = resolve_config("dev", None, &set, false, Path::new("/w"));
        assert_eq!(vm.ca_certs, Some(PathBuf::from("/etc/proxy-ca")));
        let (kept, _) = resolve_config(
            "dev",
            Some(vm.clone()),
            &CreationFlags::default(),
            false,
            Path::new("/w"),
        );
        assert_eq!(kept.ca_certs, vm.ca_certs);
        let clear = CreationFlags {
            ca_certs: Some(None),
            ..Default::default()
        };
        let (running, notices) =
            resolve_config("dev", Some(vm.clone()), &clear, true, Path::new("/w"));
        assert_eq!(running.ca_certs, vm.ca_certs);
        assert!(notices[0].contains("--ca-certs ignored"), "{notices:?}");
        let (cleared, notices) = resolve_config("dev", Some(vm), &clear, false, Path::new("/w"));
        assert_eq!(cleared.ca_certs, None);
        assert!(notices[0].contains("now none"), "{notices:?}");
    }

    #[test]
    fn new_vm_takes_flags_and_defaults() {
        let flags = CreationFlags {
            memory_mb: Some(512),
            ..Default::default()
        };
        let (vm, notices) = resolve_config("dev", None, &flags, false, Path::new("/src/b"));
        assert_eq!(vm.memory_mb, 512);
        assert_eq!(vm.disk_size, DEFAULT_DISK_SIZE);
        assert_eq!(vm.dir, Path::new("/src/b"));
        assert!(notices.is_empty());
    }

    #[test]
    fn disk_size_is_fixed_after_creation() {
        let flags = CreationFlags {
            disk_size: Some(20 << 30),
            ..Default::default()
        };
        let (vm, notices) = resolve_config("dev", Some(existing()), &flags, false, Path::new("/x"));
        assert_eq!(vm.disk_size, 10 << 30);
        assert!(notices[0].starts_with("--disk-size ignored"), "{notices:?}");
    }

    #[test]
    fn stopped_vm_takes_new_shape_running_vm_does_not() {
        let flags = CreationFlags {
            cpus: Some(4),
            dir: Some("/src/c".into()),
            ..Default::default()
        };
        let (vm, notices) = resolve_config("dev", Some(existing()), &flags, false, Path::new("/x"));
        assert_eq!((vm.cpus, vm.dir.as_path()), (4, Path::new("/src/c")));
        assert!(notices.is_empty());
        let (vm, notices) = resolve_config("dev", Some(existing()), &flags, true, Path::new("/x"));
        assert_eq!(vm, existing());
        assert!(notices[0].contains("--cpus, --dir ignored"), "{notices:?}");
    }

    #[test]
    fn volumes_change_at_the_next_start_with_a_notice() {
        let models = VolumeMount {
            name: "models".into(),
            path: "/opt/models".into(),
        };
        let flags = CreationFlags {
            volumes: Some(vec![models.clone()]),
            ..Default::default()
        };
        let (vm, notices) = resolve_config("dev", Some(existing()), &flags, false, Path::new("/x"));
        assert_eq!(vm.volumes, std::slice::from_ref(&models));
        assert_eq!(
            notices,
            ["VM dev's volumes are now models:/opt/models (were none)"]
        );
        let (vm2, notices) = resolve_config("dev", Some(existing()), &flags, true, Path::new("/x"));
        assert!(vm2.volumes.is_empty());
        assert!(
            notices[0].contains("--volume ignored: VM dev is running"),
            "{notices:?}"
        );
        // No --volume: the recorded list stays; an empty one clears it.
        let (vm3, _) = resolve_config(
            "dev",
            Some(vm.clone()),
            &CreationFlags::default(),
            false,
            Path::new("/x"),
        );
        assert_eq!(vm3.volumes, [models]);
        let clear = CreationFlags {
            volumes: Some(Vec::new()),
            ..Default::default()
        };
        let (vm4, _) = resolve_config("dev", Some(vm), &clear, false, Path::new("/x"));
        assert!(vm4.volumes.is_empty());
        let new = resolve_config("dev", None, &flags, false, Path::new("/x")).0;
        assert_eq!(new.volumes.len(), 1);
    }

    #[test]
    fn old_vm_json_without_network_is_open_by_default() {
        let json = r#"{"name":"dev","dir":"/x","cpus":1,"memory_mb":512,"disk_size":1,"profile":null,"created_at":1}"#;
        let vm: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(vm.network, NetworkSettings::recorded_before_public());
        assert_eq!(vm.network.summary(), "open");
        assert!(!vm.network.mode_chosen);
    }

    /// What pen wrote before mode `public`: `open` as the default, or chosen; no
    /// `mode_chosen` either way.
    fn old_vm(mode: &str) -> VmConfig {
        let json = format!(
            r#"{{"name":"dev","dir":"/x","cpus":1,"memory_mb":512,"disk_size":1,"profile":null,"created_at":1,
            "network":{{"mode":"{mode}","allow":[],"allow_hosts":["127.0.0.1:9"],"publish":[]}}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn a_vm_open_by_the_old_default_becomes_public_at_its_next_start() {
        let none = CreationFlags::default();
        let (vm, notices) =
            resolve_config("dev", Some(old_vm("open")), &none, false, Path::new("/x"));
        assert_eq!(vm.network.mode, NETWORK_PUBLIC);
        assert!(!vm.network.mode_chosen);
        assert_eq!(vm.network.allow_hosts, ["127.0.0.1:9"], "the rest stays");
        assert_eq!(
            notices,
            ["VM dev's network is now public (the internet, not the LAN: pen's new default) instead of open; to keep open, start it with --network open"]
        );
        // Once saved, it is public without a word.
        let (again, notices) =
            resolve_config("dev", Some(vm.clone()), &none, false, Path::new("/x"));
        assert_eq!((again, notices), (vm, vec![]));

        // Running: it keeps what its supervisor serves, and nothing is said yet.
        let (vm, notices) =
            resolve_config("dev", Some(old_vm("open")), &none, true, Path::new("/x"));
        assert_eq!((vm, notices), (old_vm("open"), vec![]));

        // `--network open` keeps it open, now as a choice, without a notice.
        let open = CreationFlags {
            network_mode: Some(("open".into(), vec![])),
            ..Default::default()
        };
        let (vm, notices) =
            resolve_config("dev", Some(old_vm("open")), &open, false, Path::new("/x"));
        assert_eq!(
            (vm.network.mode.as_str(), vm.network.mode_chosen),
            ("open", true)
        );
        assert!(notices.is_empty(), "{notices:?}");
        let (vm, notices) = resolve_config("dev", Some(vm), &none, false, Path::new("/x"));
        assert_eq!(vm.network.mode, "open");
        assert!(notices.is_empty(), "{notices:?}");

        // Another mode was always a choice.
        let (vm, notices) =
            resolve_config("dev", Some(old_vm("none")), &none, false, Path::new("/x"));
        assert_eq!((vm.network.mode.as_str(), notices), ("none", vec![]));
    }

    #[test]
    fn a_new_vm_is_public_unless_a_mode_is_chosen() {
        let (vm, _) = resolve_config(
            "dev",
            None,
            &CreationFlags::default(),
            false,
            Path::new("/x"),
        );
        assert_eq!(
            (vm.network.mode.as_str(), vm.network.mode_chosen),
            ("public", false)
        );
        let open = CreationFlags {
            network_mode: Some(("open".into(), vec![])),
            allow_nets: Some(vec!["10.20.0.0/16".into()]),
            ..Default::default()
        };
        let (vm, _) = resolve_config("dev", None, &open, false, Path::new("/x"));
        assert_eq!(
            (vm.network.mode.as_str(), vm.network.mode_chosen),
            ("open", true)
        );
        assert_eq!(vm.network.summary(), "open +1net");
        // Saved and read back, a chosen open stays open.
        let json = serde_json::to_string(&vm).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        let (again, notices) = resolve_config(
            "dev",
            Some(back),
            &CreationFlags::default(),
            false,
            Path::new("/x"),
        );
        assert_eq!((again, notices), (vm, vec![]));
    }

    #[test]
    fn network_changes_at_the_next_start_with_a_notice() {
        let flags = CreationFlags {
            network_mode: Some(("allow".into(), vec!["deb.debian.org".into()])),
            publish: Some(vec!["8080:80".into()]),
            ..Default::default()
        };
        let (vm, notices) = resolve_config("dev", Some(existing()), &flags, false, Path::new("/x"));
        assert_eq!(vm.network.mode_text(), "allow=deb.debian.org");
        assert_eq!(vm.network.publish, ["8080:80"]);
        assert_eq!(
            notices,
            ["VM dev's network is now allow=deb.debian.org (publish 8080:80) (was public)"]
        );
        // Flags that are not given keep what is recorded.
        let flags = CreationFlags {
            allow_hosts: Some(vec!["127.0.0.1:9".into()]),
            ..Default::default()
        };
        let (vm2, _) = resolve_config("dev", Some(vm.clone()), &flags, false, Path::new("/x"));
        assert_eq!(vm2.network.mode, "allow");
        assert_eq!(vm2.network.allow_hosts, ["127.0.0.1:9"]);
        let (vm3, notices) = resolve_config("dev", Some(vm.clone()), &flags, true, Path::new("/x"));
        assert_eq!(vm3, vm);
        assert!(
            notices[0].contains("--network/--allow-host/--allow-net/--publish ignored"),
            "{notices:?}"
        );
    }
}
