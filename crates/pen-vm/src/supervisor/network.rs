//! The VM's network: pen-net's backend, served by the supervisor.
//!
//! [`start`] runs before QEMU: it checks the recorded policy, binds the published ports
//! (a port in use fails the start, naming it) and listens on `net.sock`. QEMU's
//! `-netdev stream` connects to that socket when it starts; every QEMU of this supervisor
//! (a cold boot, a restore, the cold boot after a failed restore) is served in turn by
//! one task on the supervisor's runtime. The policy state (names resolved for this VM,
//! refusals already logged) lives as long as the supervisor.
//!
//! Each refused destination is logged once to supervisor.log as
//! `supervisor: network: refused tcp 169.254.169.254:80: link-local or metadata address`;
//! `pen logs --network` shows those lines ([`REFUSAL_PREFIX`]).

use std::sync::Arc;

use anyhow::Context;
use pen_core::paths::VmPaths;
use pen_core::vm::{describe_network, NetworkSettings};
use pen_net::Backend;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::net;

/// What every refusal line of supervisor.log starts with.
pub const REFUSAL_PREFIX: &str = "supervisor: network: refused ";

/// The running backend; dropping it stops serving and closes the published ports.
pub(super) struct Network {
    task: JoinHandle<()>,
}

impl Drop for Network {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds the backend and its socket. Errors are one line (e.g. a published port in use).
pub(super) async fn start(paths: &VmPaths, settings: &NetworkSettings) -> anyhow::Result<Network> {
    let (mut policy, publishes) = net::policy(settings).map_err(anyhow::Error::msg)?;
    if let Some(file) = std::env::var_os(net::HOSTS_FILE_ENV).filter(|v| !v.is_empty()) {
        policy.dns_overrides = net::read_hosts_file(std::path::Path::new(&file))?;
        eprintln!(
            "supervisor: network: DNS answers from {} first ({}, a test hook)",
            std::path::Path::new(&file).display(),
            net::HOSTS_FILE_ENV
        );
    }
    let backend = Backend::bind(policy, &publishes)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("supervisor: network: {}", describe_network(settings));
    for (spec, at) in backend.published() {
        eprintln!("supervisor: network: published {spec} on {at}");
    }
    let sock = paths.net_socket();
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let task = tokio::spawn(serve(listener, Arc::new(backend)));
    Ok(Network { task })
}

/// Serves each QEMU that connects, one after the other.
async fn serve(listener: UnixListener, backend: Arc<Backend>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("supervisor: network: accepting QEMU's connection failed: {e}");
                return;
            }
        };
        eprintln!(
            "supervisor: network: QEMU connected (+{} ms)",
            super::since_start()
        );
        match backend
            .serve(stream, |event| eprintln!("supervisor: network: {event}"))
            .await
        {
            Ok(()) => eprintln!("supervisor: network: QEMU disconnected"),
            Err(e) => eprintln!("supervisor: network: {e}"),
        }
    }
}
