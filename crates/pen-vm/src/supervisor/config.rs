//! The per-VM configuration the guest receives at the stage-1 point (`Config`).

use std::time::{SystemTime, UNIX_EPOCH};

use pen_proto::{BootMode, GuestConfig, GuestVolume, WORKSPACE_TAG};

use super::Params;

/// The per-VM configuration, with a fresh clock, entropy and machine-id.
pub(super) fn guest_config(name: &str, params: &Params, volumes: &[GuestVolume]) -> GuestConfig {
    GuestConfig {
        volumes: volumes.to_vec(),
        // Sent at every boot and restore: the snapshot point is before the config, so no
        // snapshot ever holds them.
        ca_certs: params.ca_certs.clone(),
        ..fresh_guest_config(
            name,
            params.env.clone(),
            params.mode,
            params.setup_script.clone(),
        )
    }
}

/// A guest configuration for VM `hostname` as of now: the host clock, 32 fresh bytes of
/// entropy and a fresh machine-id, so no two boots (or restores) share them.
pub fn fresh_guest_config(
    hostname: &str,
    env: Vec<(String, String)>,
    mode: BootMode,
    setup_script: Option<String>,
) -> GuestConfig {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut entropy = vec![0u8; 32];
    let mut id = [0u8; 16];
    // getrandom only fails on kernels older than 3.17 without /dev/urandom.
    getrandom::fill(&mut entropy).expect("getrandom");
    getrandom::fill(&mut id).expect("getrandom");
    GuestConfig {
        hostname: hostname.to_string(),
        env,
        workspace_tag: match mode {
            BootMode::Shell => Some(WORKSPACE_TAG.to_string()),
            BootMode::Build => None,
        },
        clock_secs: now.as_secs() as i64,
        clock_nanos: now.subsec_nanos(),
        mode,
        setup_script,
        entropy,
        machine_id: hex::encode(id),
        volumes: Vec::new(),
        ca_certs: Vec::new(),
    }
}
