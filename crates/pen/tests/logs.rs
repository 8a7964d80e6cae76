//! Logs a guest fills stay capped on the host: `console.log` and its one rotation never
//! outgrow [`CAP`] each, the previous run's log survives a restart as `.1`, and
//! `pen logs -f` follows across a rotation.

mod common;

use std::time::Duration;

use common::*;

/// `pen_core::logfile::CONSOLE_LOG_MAX`.
const CAP: u64 = 4 << 20;

fn len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn console_log_is_capped_and_rotated() {
    let pen = Pen::new("console-cap");
    pen.start("loud");
    let dir = pen.vm_dir("loud");
    let log = dir.join("console.log");
    let old = dir.join("console.log.1");
    let follow = pen.spawn(&["logs", "-f", "loud"], None);
    // Three times the cap through the serial port (about 0.4 MB/s under TCG).
    let total = 3 * CAP;
    pen.exec(
        "loud",
        &[
            "sh",
            "-c",
            &format!("echo first-marker >/dev/ttyS0; head -c {total} /dev/zero | tr '\\0' x >/dev/ttyS0; echo last-marker >/dev/ttyS0"),
        ],
    )
    .ok();
    let done = wait_until(Duration::from_secs(30), || {
        std::fs::read(&log).is_ok_and(|b| b.windows(11).any(|w| w == b"last-marker"))
    });
    assert!(done, "the console's last line never reached console.log");
    assert!(len(&log) <= CAP, "console.log is {} bytes", len(&log));
    assert!(len(&old) <= CAP, "console.log.1 is {} bytes", len(&old));
    assert!(len(&old) > 0, "no rotation happened");

    // `pen logs -f` followed the log across its rotations.
    std::thread::sleep(Duration::from_secs(1));
    kill9(follow.pid());
    let followed = follow.wait(Duration::from_secs(10));
    assert!(
        followed.stdout.len() as u64 >= total,
        "pen logs -f printed {} bytes of {total}",
        followed.stdout.len()
    );
    let text = followed.stdout_str();
    assert!(text.contains("first-marker") && text.contains("last-marker"));

    // A restart keeps the previous run's log as .1.
    pen.run(&["stop", "loud"]).ok();
    pen.start("loud");
    let previous = std::fs::read(&old).unwrap();
    assert!(
        previous.windows(11).any(|w| w == b"last-marker"),
        "the previous run's console log is gone"
    );
    assert!(len(&log) < CAP);
    pen.run(&["stop", "loud"]).ok();
}
