//! Hand-testing harness for the supervisor and its clients before the CLI exists:
//! `PEN_HOME=/tmp/h penvm {shell|exec|start|stop|stop-force} NAME [-t] [-- CMD...]`.
//! Images come from `PENVM_IMAGES` (default /tmp/penimg); the shared dir is the cwd.

use pen_core::client::{self, StartOptions};
use pen_core::paths::{PenHome, VmPaths};
use pen_core::vm::VmConfig;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pen: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: Vec<String>) -> anyhow::Result<i32> {
    let home = PenHome::from_env()?;
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let name = args.get(1).cloned().unwrap_or_else(|| "dev".into());
    if cmd == "__supervise" {
        pen_core::supervisor::main(&home, &name)?;
        return Ok(0);
    }
    let paths = VmPaths::new(&home, &name);
    let vm = match VmConfig::load(&paths)? {
        Some(vm) => vm,
        None => {
            let vm = VmConfig {
                name: name.clone(),
                dir: std::env::current_dir()?,
                cpus: 2,
                memory_mb: 1024,
                disk_size: 1 << 30,
                profile: None,
                setup_hash: None,
                created_at: pen_core::vm::now_secs(),
            };
            vm.save(&paths)?;
            vm
        }
    };
    let images = std::env::var("PENVM_IMAGES").unwrap_or_else(|_| "/tmp/penimg".into());
    let env: Vec<(String, String)> = std::env::var("PENVM_ENV")
        .ok()
        .and_then(|v| {
            v.split_once('=')
                .map(|(k, v)| vec![(k.to_string(), v.to_string())])
        })
        .unwrap_or_default();
    let opts = |keep_running| StartOptions {
        accel: None,
        env: env.clone(),
        keep_running,
        rootfs: format!("{images}/rootfs.sqfs").into(),
        kernel: format!("{images}/vmlinuz").into(),
        initrd: format!("{images}/initrd").into(),
        setup_script: std::env::var("PENVM_SETUP").ok(),
        quiet: false,
    };
    let rest: Vec<String> = args.iter().skip(2).cloned().collect();
    let tty = rest.first().map(|a| a == "-t").unwrap_or(false);
    let argv: Vec<String> = match rest.iter().position(|a| a == "--") {
        Some(i) => rest[i + 1..].to_vec(),
        None => Vec::new(),
    };
    match cmd {
        "start" => {
            client::ensure_running(&home, &vm, opts(true))?;
            Ok(0)
        }
        "shell" => {
            client::ensure_running(&home, &vm, opts(false))?;
            client::shell(&home, &name, vec![])
        }
        "exec" => {
            client::ensure_running(&home, &vm, opts(false))?;
            client::exec(&home, &name, argv, vec![], tty)
        }
        "stop" => client::stop(&home, &name, false).map(|_| 0),
        "stop-force" => client::stop(&home, &name, true).map(|_| 0),
        _ => anyhow::bail!("usage: penvm shell|exec|start|stop|stop-force NAME [-t] [-- CMD...]"),
    }
}
