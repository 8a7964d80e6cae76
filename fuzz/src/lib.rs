//! Harnesses behind pen's fuzz targets (`fuzz_targets/`, one per parser that takes bytes a
//! guest chooses). They live in this library so that `cargo test` here replays the seed
//! corpora and checks the panic policy without libFuzzer. See README.md.

pub mod input;
pub mod link;
pub mod net;
pub mod panics;
pub mod policy;

/// One function per fuzz target, named like it.
pub mod targets {
    /// The host's decoder of the agent link: what the supervisor reads from the guest.
    pub fn agent_link_from_guest(data: &[u8]) {
        crate::link::from_guest(data)
    }

    /// The guest agent's decoder of the agent link: what pen-init reads from the host.
    pub fn agent_link_from_host(data: &[u8]) {
        crate::link::from_host(data)
    }

    /// A guest's Ethernet frames through pen-net's backend (ARP, IPv4, TCP, UDP, ICMP).
    pub fn net_guest_frames(data: &[u8]) {
        crate::net::guest_frames(data)
    }

    /// One DNS query to pen's DNS server at 10.0.2.3, through the backend.
    pub fn net_dns_query(data: &[u8]) {
        crate::net::dns_query(data)
    }

    /// pen-net's policy: configuration, names, resolved addresses and destinations.
    pub fn net_policy(data: &[u8]) {
        crate::policy::decisions(data)
    }
}
