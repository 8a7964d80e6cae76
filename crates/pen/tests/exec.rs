//! `pen exec`: exit status, stdin, binary-safe stdout, stderr kept apart, and several
//! sessions at once. Each test starts its VM with `pen start` so that its execs attach to a
//! running VM instead of booting one each.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn exit_status_is_the_remote_one() {
    let pen = Pen::new("exec-status");
    pen.start("codes");
    pen.exec("codes", &["true"]).code_is(0);
    pen.exec("codes", &["sh", "-c", "exit 3"]).code_is(3);
    // Death by signal N is 128+N, as a shell reports it.
    pen.exec("codes", &["sh", "-c", "kill -9 $$"]).code_is(137);
    pen.exec("codes", &["sh", "-c", "kill -15 $$"]).code_is(143);
    // A command that does not exist: the guest's answer, not a pen crash.
    let out = pen.exec("codes", &["no-such-command-xyz"]);
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "a missing command must fail:\n{out}"
    );
}

#[test]
fn stdin_is_piped_and_stdout_stderr_stay_apart() {
    let pen = Pen::new("exec-stdio");
    pen.start("stdio");
    let out = pen
        .exec_stdin("stdio", &["tr", "a-z", "A-Z"], b"hello from the host\n")
        .ok();
    assert_eq!(out.stdout_str(), "HELLO FROM THE HOST\n", "{out}");

    // No stdin at all (an empty pipe) must give EOF, not a hang.
    let out = pen.exec_stdin("stdio", &["wc", "-c"], b"").ok();
    assert_eq!(out.stdout_str().trim(), "0", "{out}");

    let out = pen
        .exec("stdio", &["sh", "-c", "echo out; echo err >&2; echo out2"])
        .ok();
    assert_eq!(out.stdout_str(), "out\nout2\n", "stdout only:\n{out}");
    assert!(out.stderr.contains("err\n"), "stderr:\n{out}");
    assert!(
        !out.stderr.contains("out"),
        "stdout leaked to stderr:\n{out}"
    );
}

#[test]
fn a_mebibyte_of_random_bytes_round_trips_exactly() {
    let pen = Pen::new("exec-binary");
    pen.start("bin");
    let data = random_bytes(1 << 20);
    let out = pen.exec_stdin("bin", &["cat"], &data).ok();
    assert_eq!(out.stdout.len(), data.len(), "length differs");
    assert!(out.stdout == data, "bytes differ after cat");

    // Through the guest's disk and back on stderr, which must be binary-safe too.
    let out = pen
        .exec_stdin(
            "bin",
            &["sh", "-c", "cat > /tmp/blob && cat /tmp/blob >&2"],
            &data,
        )
        .ok();
    assert!(out.stdout.is_empty(), "stderr leaked to stdout");
    // Allow for a notice from pen before the data, nothing else.
    assert!(out.stderr_bytes.ends_with(&data), "stderr bytes differ");
}

#[test]
fn two_sessions_run_at_once() {
    let pen = Pen::new("exec-two");
    pen.start("two");
    // A long session...
    let slow = pen.spawn(
        &pen.exec_args("two", &["sh", "-c", "sleep 6; echo slow-done"]),
        None,
    );
    std::thread::sleep(Duration::from_secs(2));
    // ...while short ones come and go.
    for i in 0..3 {
        let out = pen.exec("two", &["echo", &format!("quick-{i}")]).ok();
        assert_eq!(out.stdout_str(), format!("quick-{i}\n"));
    }
    let mut slow = slow;
    assert!(
        slow.try_wait().is_none(),
        "the long session ended early (or the short ones waited for it)"
    );
    let out = slow.wait(TIMEOUT).ok();
    assert_eq!(out.stdout_str(), "slow-done\n", "{out}");
}
