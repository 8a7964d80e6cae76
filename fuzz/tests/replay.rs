//! Replays every committed input (seed corpora in `seeds/<target>/`, crashes found and
//! fixed in `regressions/<target>/`) through its harness, under the fuzz targets' panic
//! policy: what the fuzz runs found stays found without libFuzzer.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    pen_fuzz::panics::install();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("{target}: {}", path.display());
            pen_fuzz::panics::guard(|| harness(&data));
            n += 1;
        }
    }
    assert!(n > 0, "no inputs for {target}");
}

#[test]
fn agent_link_from_guest() {
    replay(
        "agent_link_from_guest",
        pen_fuzz::targets::agent_link_from_guest,
    );
}

#[test]
fn agent_link_from_host() {
    replay(
        "agent_link_from_host",
        pen_fuzz::targets::agent_link_from_host,
    );
}

#[test]
fn net_guest_frames() {
    replay("net_guest_frames", pen_fuzz::targets::net_guest_frames);
}

#[test]
fn net_dns_query() {
    replay("net_dns_query", pen_fuzz::targets::net_dns_query);
}

#[test]
fn net_policy() {
    replay("net_policy", pen_fuzz::targets::net_policy);
}
