//! Serve pen-net on a unix socket for a hand-started QEMU:
//!
//! ```text
//! cargo run -p pen-net --example serve -- /tmp/net.sock [--open|--none] [--allow DOMAIN]...
//!     [--allow-host ADDR:PORT]... [--allow-net CIDR]... [--publish SPEC]...
//! qemu-system-x86_64 ... -netdev stream,id=net0,server=off,addr.type=unix,addr.path=/tmp/net.sock \
//!     -device virtio-net-pci,netdev=net0
//! ```
//!
//! Each QEMU connection is served in turn (a restarted QEMU reconnects to the same
//! backend); refusals are printed as they happen.

use pen_net::{validate_domain, Backend, Cidr, Mode, NetworkPolicy, PublishSpec};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: serve SOCKET [options]")?;
    let mut policy = NetworkPolicy::default();
    let mut domains = Vec::new();
    let mut publishes = Vec::new();
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--open" => policy.mode = Mode::Open,
            "--none" => policy.mode = Mode::None,
            "--allow" => domains.push(validate_domain(&val()?)?),
            "--allow-host" => policy.allow_hosts.push(val()?.parse()?),
            "--allow-net" => policy.allow_nets.push(Cidr::parse(&val()?)?),
            "--publish" => publishes.push(val()?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if !domains.is_empty() {
        policy.mode = Mode::Allow(domains);
    }
    let publishes = PublishSpec::parse_all(&publishes)?;
    let backend = Backend::bind(policy, &publishes).await?;
    for (spec, at) in backend.published() {
        eprintln!("published {spec} on {at}");
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    eprintln!("serving on {path}");
    loop {
        let (stream, _) = listener.accept().await?;
        eprintln!("QEMU connected");
        let r = backend.serve(stream, |e| eprintln!("pen-net: {e}")).await;
        eprintln!("QEMU disconnected: {r:?}");
    }
}
