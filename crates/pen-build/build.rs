//! Builds the guest agent `pen-init` as a static binary and hands its path to the library,
//! which embeds it (`include_bytes!`) so that one `pen` binary can build complete images.
//!
//! pen-init needs `-C target-feature=+crt-static`. Passing that through the outer build
//! would also apply it to proc-macros, so we run a nested cargo with an explicit `--target`
//! and a target directory of its own (`target/guest`). Set `PEN_INIT_BIN` to use a prebuilt
//! binary instead.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PEN_INIT_BIN");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    for dir in ["crates/pen-init", "crates/pen-proto", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }

    let binary = match std::env::var_os("PEN_INIT_BIN") {
        Some(path) => PathBuf::from(path),
        None => build_pen_init(&workspace).unwrap_or_else(|| {
            // Keep the host side buildable while the guest does not compile; images cannot
            // be built from this pen (the library refuses an empty pen-init with a message).
            println!("cargo:warning=pen-init failed to build; this pen cannot build images");
            let empty = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("pen-init-missing");
            std::fs::write(&empty, b"").unwrap();
            empty
        }),
    };
    println!("cargo:rustc-env=PEN_INIT_PATH={}", binary.display());
    // Hashed here, not at run time: every `pen` command compares it with base.json.
    use sha2::Digest;
    let bytes = std::fs::read(&binary).expect("reading pen-init");
    println!(
        "cargo:rustc-env=PEN_INIT_SHA256={}",
        hex::encode(sha2::Sha256::digest(bytes))
    );
}

fn build_pen_init(workspace: &std::path::Path) -> Option<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    // A relative CARGO_TARGET_DIR is relative to where cargo runs (the workspace); the
    // path must be absolute because the library include_bytes!() it from its own source dir.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace.join(dir))
        .unwrap_or_else(|| workspace.join("target"))
        .join("guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "pen-init",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags are for the host tools, not for the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .expect("running cargo to build pen-init");
    status
        .success()
        .then(|| target_dir.join(TARGET).join("release").join("pen-init"))
}
