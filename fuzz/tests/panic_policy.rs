//! The fuzz targets' panic policy (src/panics.rs), each case in a child process of its
//! own: a contained smoltcp panic lets the run go on; every panic outside that
//! containment aborts, which is what makes libFuzzer record a crash.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use smoltcp::wire::TcpSeqNumber;

const SCENARIO: &str = "PEN_FUZZ_PANIC_SCENARIO";

/// smoltcp-rs/smoltcp#1048's panic itself: sequence numbers subtracted with underflow,
/// raised in smoltcp's `wire::tcp`.
fn smoltcp_1048() -> i32 {
    let a = std::hint::black_box(TcpSeqNumber(0));
    (a - TcpSeqNumber(1)) as i32
}

fn run(scenario: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(SCENARIO, scenario)
        .output()
        .unwrap()
        .status
}

/// The body of each scenario, run by `run` in a child (does nothing in the parent run).
#[test]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    pen_fuzz::panics::install();
    pen_fuzz::panics::guard(|| match scenario.as_str() {
        // As pen-net's Stack::poll: catch_unwind around smoltcp.
        "contained" => {
            let r = std::panic::catch_unwind(smoltcp_1048);
            assert!(r.is_err());
        }
        // The same panic where pen has no catch_unwind.
        "smoltcp_uncontained" => {
            smoltcp_1048();
        }
        // pen's own bug under pen's catch_unwind (which is there for smoltcp only).
        "pen_under_containment" => {
            let _ = std::panic::catch_unwind(|| panic!("a bug of pen's"));
        }
        // pen's own bug in a tokio task, where tokio would catch it and nobody would see.
        "pen_in_task" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let r = rt.block_on(tokio::spawn(async { panic!("a bug in a task") }));
            assert!(r.is_err());
        }
        other => panic!("unknown scenario {other}"),
    });
}

#[test]
fn a_contained_smoltcp_panic_does_not_stop_the_run() {
    assert!(run("contained").success());
}

#[test]
fn panics_outside_the_containment_abort() {
    for scenario in [
        "smoltcp_uncontained",
        "pen_under_containment",
        "pen_in_task",
    ] {
        let status = run(scenario);
        assert_eq!(
            status.signal(),
            Some(libc_sigabrt()),
            "{scenario}: {status}"
        );
    }
}

fn libc_sigabrt() -> i32 {
    6
}

#[test]
fn upstream_paths_are_recognised() {
    use pen_fuzz::panics::is_contained_upstream;
    assert!(is_contained_upstream(
        "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/smoltcp-0.12.0/src/wire/tcp.rs"
    ));
    assert!(!is_contained_upstream("crates/pen-net/src/backend.rs"));
    assert!(!is_contained_upstream(
        "/x/tokio-1.54.1/src/runtime/task/harness.rs"
    ));
}
