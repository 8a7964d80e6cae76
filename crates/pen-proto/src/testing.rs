//! Property-test strategies for [`Message`]s and [`Frame`]s (feature `testing`, and this
//! crate's own tests). Crates that relay frames (the supervisor's router, the client) use them
//! to play a hostile peer: any variant, on any session, with payloads from empty to large.
//!
//! Sizes stay small (strings up to 64 bytes, data up to 8 KiB) so thousands of cases run in
//! well under a second; the properties that need large data build it themselves.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::{
    BootMode, ExecRequest, ExitStatus, Frame, GuestConfig, GuestVolume, Message, SessionId,
    TtyRequest, WindowSize,
};

fn text() -> impl Strategy<Value = String> {
    ".{0,64}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn window_size() -> impl Strategy<Value = WindowSize> {
    (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| WindowSize { rows, cols })
}

fn exec_request() -> impl Strategy<Value = ExecRequest> {
    (
        vec(text(), 0..4),
        vec((text(), text()), 0..3),
        proptest::option::of(text()),
        proptest::option::of(
            (text(), window_size()).prop_map(|(term, size)| TtyRequest { term, size }),
        ),
    )
        .prop_map(|(argv, env, cwd, tty)| ExecRequest {
            argv,
            env,
            cwd,
            tty,
        })
}

fn guest_config() -> impl Strategy<Value = GuestConfig> {
    (
        text(),
        vec((text(), text()), 0..3),
        proptest::option::of(text()),
        any::<i64>(),
        any::<u32>(),
        prop_oneof![Just(BootMode::Shell), Just(BootMode::Build)],
        proptest::option::of(text()),
        bytes(32),
        text(),
        vec(
            (any::<u8>(), text()).prop_map(|(slot, path)| GuestVolume { slot, path }),
            0..3,
        ),
        vec(text(), 0..3),
    )
        .prop_map(
            |(
                hostname,
                env,
                workspace_tag,
                clock_secs,
                clock_nanos,
                mode,
                setup_script,
                entropy,
                machine_id,
                volumes,
                ca_certs,
            )| {
                GuestConfig {
                    hostname,
                    env,
                    workspace_tag,
                    clock_secs,
                    clock_nanos,
                    mode,
                    setup_script,
                    entropy,
                    machine_id,
                    volumes,
                    ca_certs,
                }
            },
        )
}

fn exit_status() -> impl Strategy<Value = ExitStatus> {
    prop_oneof![
        any::<i32>().prop_map(ExitStatus::Exited),
        any::<i32>().prop_map(ExitStatus::Signaled),
    ]
}

/// Any message, every variant equally likely.
pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(version, software)| Message::Hello { version, software }),
        Just(Message::AwaitingConfig),
        guest_config().prop_map(Message::Config),
        Just(Message::Ready),
        (text(), text()).prop_map(|(stage, message)| Message::BootFailed { stage, message }),
        text().prop_map(|text| Message::Log { text }),
        any::<bool>().prop_map(|force| Message::Shutdown { force }),
        Just(Message::KeepRunning),
        exec_request().prop_map(Message::Exec),
        any::<u32>().prop_map(|pid| Message::Started { pid }),
        bytes(8192).prop_map(Message::Stdin),
        bytes(8192).prop_map(Message::Stdout),
        bytes(8192).prop_map(Message::Stderr),
        window_size().prop_map(Message::Resize),
        any::<i32>().prop_map(Message::Signal),
        exit_status().prop_map(Message::Exit),
        text().prop_map(Message::Error),
        any::<u32>().prop_map(Message::Window),
        any::<u64>().prop_map(|free| Message::HostSpace { free }),
    ]
}

/// A session id a hostile peer might use: mostly small (CONTROL, live sessions), sometimes any.
pub fn session() -> impl Strategy<Value = SessionId> {
    prop_oneof![4 => 0u32..8, 1 => any::<u32>()]
}

/// Any frame: [`session`] and [`message`].
pub fn frame() -> impl Strategy<Value = Frame> {
    (session(), message()).prop_map(|(session, message)| Frame { session, message })
}
