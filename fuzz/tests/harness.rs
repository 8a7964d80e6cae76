//! The network harnesses reach what they are for: a seed query is answered, and a seed
//! TCP connection from a real VM's capture gets past the handshake to the in-memory host
//! and back (the acknowledgement rebasing works). A harness that silently stopped at the
//! first frame would still "pass" every fuzz run.

use std::path::Path;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect()
}

#[test]
fn seed_queries_are_answered() {
    pen_fuzz::panics::install();
    for seed in seeds("net_dns_query") {
        assert_eq!(pen_fuzz::net::dns_answers(&seed).len(), 1);
    }
}

/// A backend TCP segment carrying data (ACK and PSH, no SYN) to the guest.
fn is_tcp_data(frame: &[u8]) -> bool {
    frame.len() > 54 && frame[23] == 6 && frame[47] & 0x02 == 0 && frame[47] & 0x08 != 0
}

#[test]
fn a_captured_connection_reaches_the_host_and_gets_its_echo() {
    pen_fuzz::panics::install();
    let echoed = seeds("net_guest_frames").iter().any(|seed| {
        pen_fuzz::net::guest_frames_replies(seed)
            .iter()
            .any(|f| is_tcp_data(f))
    });
    assert!(
        echoed,
        "no seed connection got data back from the host side"
    );
}
