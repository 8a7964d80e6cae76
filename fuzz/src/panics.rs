//! The fuzz targets' panic policy.
//!
//! pen contains panics of smoltcp (smoltcp-rs/smoltcp#1048 and its kind, reachable from a
//! guest's segments) with `catch_unwind` around the stack's poll (`Stack::poll`/`pump` in
//! pen-net's backend): the VM's network ends with `NetError::Stack`, the supervisor lives
//! on. The fuzz targets call the entry point the supervisor calls, `Backend::serve`, so
//! such a contained panic must not stop a fuzz run, while any other panic must:
//!
//! * a panic raised in smoltcp's code unwinds as in production: into pen's `catch_unwind`
//!   (contained; the run goes on), or past it to the `catch_unwind` libFuzzer wraps each
//!   input in, which aborts: a crash, as it should be when pen fails to contain it;
//! * every other panic aborts at once, even inside a tokio task (where tokio would
//!   swallow it and the bug would go unseen) or under pen's `catch_unwind` (which is there
//!   for smoltcp alone).
//!
//! libfuzzer-sys installs a hook that aborts on every panic before it unwinds; [`install`]
//! replaces it with this policy (and keeps it for everything that is not smoltcp's).

use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Upstream crates whose panics pen contains, as they appear in a panic's source path
/// (`.../smoltcp-0.12.0/src/...`).
pub const CONTAINED_UPSTREAM: &[&str] = &["smoltcp-"];

/// Contained panics seen so far (reported, not fatal).
static CONTAINED: AtomicUsize = AtomicUsize::new(0);

/// True when `file` (a panic's location) is in an upstream crate pen contains.
pub fn is_contained_upstream(file: &str) -> bool {
    let file = file.replace('\\', "/");
    CONTAINED_UPSTREAM
        .iter()
        .any(|krate| file.split('/').any(|part| part.starts_with(krate)))
}

/// Installs the policy (once per process).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
            if info
                .location()
                .is_some_and(|l| is_contained_upstream(l.file()))
            {
                // Let it unwind: pen's catch_unwind decides. Say so for the first few.
                if CONTAINED.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!(
                        "pen-fuzz: upstream panic, unwinding toward pen's containment: {info}"
                    );
                }
                return;
            }
            previous(info);
            std::process::abort();
        }));
    });
}

/// Runs `f` as libFuzzer runs one input: a panic that unwinds out of it aborts the process.
/// For running harnesses outside libFuzzer (tests, `replay`).
pub fn guard(f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        eprintln!("pen-fuzz: a panic escaped the harness: aborting");
        std::process::abort();
    }
}

/// Contained upstream panics seen by this process.
pub fn contained_count() -> usize {
    CONTAINED.load(Ordering::Relaxed)
}
