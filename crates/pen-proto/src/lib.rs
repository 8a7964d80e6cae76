//! The protocol pen speaks on its two links:
//!
//! * **host ↔ guest**: the supervisor and `pen-init` over a virtio-serial port;
//! * **client ↔ supervisor**: `pen shell` / `pen exec` / `pen stop` over a unix socket.
//!
//! Both links carry the same [`Frame`]s. A frame is
//! `[u32 length, big endian][u32 session id][postcard-encoded Message]`; length covers the
//! session id and payload. Length-delimited framing comes from `tokio-util`; the payload
//! encoding from `postcard`. Keeping the session id outside the postcard payload means a frame
//! whose payload cannot be decoded still names its session, so the receiver can end exactly
//! that session with an error and carry on (see [`FrameCodec`]).
//!
//! Session [`CONTROL`] (0) carries messages about the whole VM (hello, config, ready,
//! shutdown). Other ids name one exec session each; on the host ↔ guest link the supervisor
//! allocates them, on the client ↔ supervisor link a connection is one session and uses id 1.

#[cfg(feature = "capture")]
mod capture;
mod codec;
mod message;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod window;

pub use codec::{encode_frame, DecodeError, FrameCodec, MAX_FRAME_LEN};
pub use message::*;
pub use window::{Credit, Inbound, WindowError, GRANT_THRESHOLD, WINDOW};

/// Bumped whenever a change to [`Message`] is not backwards compatible.
/// 2: per-session flow control ([`Message::Window`], see [`window`]).
/// 3: [`GuestConfig::volumes`] (read-only volumes mounted after the snapshot point).
/// 4: [`Message::HostSpace`] (the host disk's free space, which the guest keeps within).
/// 5: [`GuestConfig::ca_certs`] (extra CA certificates the VM trusts).
pub const PROTOCOL_VERSION: u32 = 5;

/// Identifies one multiplexed session on a link.
pub type SessionId = u32;

/// The session id reserved for VM-wide messages.
pub const CONTROL: SessionId = 0;

/// The session id a client uses for its one session on a supervisor connection.
pub const CLIENT_SESSION: SessionId = 1;

/// Name of the virtio-serial port the guest agent listens on.
pub const AGENT_PORT_NAME: &str = "org.pen.agent";

/// Virtio-fs tag of the shared project directory.
pub const WORKSPACE_TAG: &str = "workspace";

/// Disk serial numbers QEMU gives the guest's block devices, so the guest can find each
/// disk by role (`/sys/block/vdX/serial`) rather than by probe order.
pub const ROOT_DISK_SERIAL: &str = "pen-root";
pub const OVERLAY_DISK_SERIAL: &str = "pen-overlay";

/// PCI slot (bus 0, function 0) of the overlay disk. The disk is on QEMU's command line, so
/// it is in every snapshot, but the guest leaves it without a driver until it has its
/// configuration: a snapshot never holds one VM's disk size or blocks, and a restore needs
/// no hot-plug.
pub const OVERLAY_DISK_PCI_SLOT: u8 = 0x10;

/// The overlay disk's PCI address as sysfs names it (`0000:00:10.0`).
pub fn overlay_disk_pci_address() -> String {
    format!("0000:00:{OVERLAY_DISK_PCI_SLOT:02x}.0")
}

/// The IP MTU of the link between the guest's NIC and pen's network backend (pen-net),
/// which pen-init sets on the NIC. The link is a unix socket carrying whole Ethernet
/// frames, so the largest frame QEMU's stream netdev carries (64 KiB) fits: each frame
/// costs the guest, QEMU and pen-net about as much whatever its size, and the NIC has no
/// segmentation offload (the stream netdev has no vnet header), so larger frames mean
/// fewer of them. Nothing past pen-net sees it: pen-net terminates every connection.
pub const LINK_MTU: usize = 65520;

/// How many read-only volumes one VM can mount: the number of volume disks every VM's
/// command line carries (a fixed device layout, so that one snapshot serves every VM).
pub const VOLUME_SLOTS: usize = 8;

/// PCI slot of volume slot 0; slot `i` sits at `VOLUME_PCI_SLOT_BASE + i`. Held without a
/// driver until `Config`, like the overlay disk, and bound only when the VM uses the slot.
pub const VOLUME_PCI_SLOT_BASE: u8 = 0x11;

/// The PCI address (`0000:00:11.0`, ...) of volume slot `slot`.
pub fn volume_pci_address(slot: usize) -> String {
    format!("0000:00:{:02x}.0", VOLUME_PCI_SLOT_BASE as usize + slot)
}

/// The disk serial of volume slot `slot` (`pen-vol0`, ...).
pub fn volume_disk_serial(slot: usize) -> String {
    format!("pen-vol{slot}")
}

/// One unit on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub session: SessionId,
    pub message: Message,
}

impl Frame {
    pub fn new(session: SessionId, message: Message) -> Self {
        Frame { session, message }
    }

    pub fn control(message: Message) -> Self {
        Frame::new(CONTROL, message)
    }
}
