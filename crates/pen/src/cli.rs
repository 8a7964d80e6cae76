//! The command line, as clap sees it. Semantics live in pen-core; see SPEC.md "Command line".

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pen",
    version,
    about = "A shell in an isolated Linux microVM, with your project at /workspace"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open an interactive shell in a VM (created and started as needed).
    Shell {
        /// VM name (default: the directory's name).
        name: Option<String>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Run one command in a VM; its exit status becomes pen's.
    ///
    /// Standard input: forwarded when it is not a terminal (a pipe, a file, /dev/null).
    /// When it is a terminal, it is forwarded only with -i or -t; otherwise the command
    /// gets end of input at once, so `pen exec ... &` and `timeout N pen exec ...` never
    /// stop waiting for the terminal (SIGTTIN).
    Exec {
        name: String,
        #[command(flatten)]
        create: CreateArgs,
        /// Give the command a pseudo-terminal (implies -i).
        #[arg(short = 't', long = "tty")]
        tty: bool,
        /// Forward this terminal's input to the command (input that is not a terminal is
        /// always forwarded).
        #[arg(short = 'i', long = "interactive")]
        interactive: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Start a VM in the background; it runs until `pen stop`.
    Start {
        name: String,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Stop a running VM (sync and power off).
    Stop {
        name: String,
        /// Kill the VM if it does not power off in time (or its supervisor does not answer).
        #[arg(long)]
        force: bool,
    },
    /// List VMs.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a stopped VM and its overlay disk.
    #[command(visible_alias = "rm")]
    Delete {
        name: String,
        /// Delete without asking, stopping the VM first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Show a VM's console log (or, with --network, what its network refused).
    Logs {
        name: String,
        /// Keep printing as the log grows.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Show the connections and names the VM's network policy refused (from
        /// supervisor.log), once per destination.
        #[arg(long, conflicts_with = "follow")]
        network: bool,
    },
    /// Images: build and list.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Read-only volumes: heavy content packed once, mounted by any number of VMs.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Profiles: list and show.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Print pen's version.
    Version,
    /// Check the host for everything pen needs, with the fix for what is missing.
    Doctor,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Internal: the per-VM supervisor (started by pen itself).
    #[command(name = "__supervise", hide = true)]
    Supervise { name: String },
}

impl Command {
    /// Commands that only print what is on disk (no VM, no supervisor).
    pub fn only_prints(&self) -> bool {
        matches!(
            self,
            Command::List { .. }
                | Command::Logs { .. }
                | Command::Version
                | Command::Doctor
                | Command::Completions { .. }
                | Command::Profile { .. }
                | Command::Volume {
                    command: VolumeCommand::List { .. }
                }
                | Command::Image {
                    command: ImageCommand::List { .. }
                }
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the base image (--base) or a profile's image.
    Build {
        /// The profile whose image to build.
        #[arg(required_unless_present = "base", conflicts_with = "base")]
        profile: Option<String>,
        /// Build the base image.
        #[arg(long)]
        base: bool,
    },
    /// List images with sizes and ages.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove stale snapshots (of images, QEMU or pen versions that are gone).
    Prune,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Pack a directory (or a tar stream) into volume NAME; re-creating replaces it, and
    /// VMs running with the old version keep it until they stop.
    Create {
        name: String,
        /// The host directory to pack (modes, symlinks, hard links and sparse files kept;
        /// owners become root).
        #[arg(long, value_name = "DIR", required_unless_present = "from_tar")]
        from: Option<PathBuf>,
        /// A tar file to pack instead, or - for standard input.
        #[arg(long = "from-tar", value_name = "FILE", conflicts_with = "from")]
        from_tar: Option<PathBuf>,
    },
    /// List volumes with their size, file count, age and the VMs that use them.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume. Refused while a VM uses it (--force: when those VMs are stopped).
    Rm {
        name: String,
        /// Remove it although stopped VMs name it: they no longer mount it (their
        /// other volumes stay).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// List profiles with their image status.
    #[command(visible_alias = "ls")]
    List,
    /// Show a profile, its image status and the VMs using it.
    Show { name: String },
}

/// Flags that create or shape a VM; recorded in vm.json on first use.
#[derive(Debug, Args, Default, Clone)]
pub struct CreateArgs {
    /// Directory shared at /workspace (default: the current directory). The VM can write
    /// all of it: `/`, your home directory (or one holding it) and pen's own directory are
    /// refused.
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
    /// Virtual CPUs (default: the host's count).
    #[arg(long, value_name = "N")]
    pub cpus: Option<String>,
    /// Memory in MB (default: 2048).
    #[arg(long, value_name = "MB")]
    pub memory: Option<String>,
    /// Overlay disk size, e.g. 10G (default 10G; fixed when the VM is created).
    #[arg(long, value_name = "SIZE")]
    pub disk_size: Option<String>,
    /// Set KEY=VALUE in the VM (repeatable). Never written to disk.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Copy KEY's value from this shell into the VM (repeatable).
    #[arg(long = "env-from-host", value_name = "KEY")]
    pub env_from_host: Vec<String>,
    /// Profile to create the VM from (profiles/<name>.toml); its image is built when
    /// missing or stale.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Accelerator: kvm or tcg (default: kvm when usable; also PEN_ACCEL).
    #[arg(long, value_name = "kvm|tcg")]
    pub accel: Option<String>,
    /// Boot the kernel instead of restoring the image's snapshot (and save none).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Guest network: public (default: the internet, not the LAN or other private
    /// ranges), open (internet and LAN), none, or allow=DOMAIN[,DOMAIN...] (only those
    /// names resolve and only their addresses are reachable; `*.example.org` means every
    /// name below example.org). Recorded; changeable at the next start.
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// Let the guest reach this exact address and port in every mode (repeatable): a LAN
    /// host, or 127.0.0.1:PORT, reached at host.pen.internal:PORT. `none` clears the list.
    #[arg(long = "allow-host", value_name = "ADDR:PORT")]
    pub allow_host: Vec<String>,
    /// Let the guest reach this internal range in every mode (repeatable), e.g.
    /// 192.168.1.0/24: part of what public keeps out. `none` clears the list.
    #[arg(long = "allow-net", value_name = "CIDR")]
    pub allow_net: Vec<String>,
    /// Publish a guest port on the host: [HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp]
    /// (repeatable; the host side is 127.0.0.1 unless given). `none` clears the list.
    #[arg(long, value_name = "SPEC")]
    pub publish: Vec<String>,
    /// Mount read-only volume NAME at PATH in the guest (repeatable; `pen volume create`
    /// makes volumes). Recorded; replaces the recorded list at the next start. `none`
    /// clears it.
    #[arg(long = "volume", value_name = "NAME:/PATH")]
    pub volume: Vec<String>,
    /// Trust these extra CA certificates (a PEM file or a directory of *.crt), e.g. a
    /// TLS-intercepting proxy's: in the guest's system store and for Node, pip, curl and
    /// OpenSSL, from the first command. Recorded by path and read at each start; `none`
    /// clears it. Without it, PEN_CA_CERTS applies.
    #[arg(long = "ca-certs", value_name = "PATH")]
    pub ca_certs: Option<String>,
}
