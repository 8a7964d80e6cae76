#![no_main]
//! The harness: pen_fuzz::targets (src/); inputs and the panic policy: fuzz/README.md.

libfuzzer_sys::fuzz_target!(init: pen_fuzz::panics::install(), |data: &[u8]| {
    pen_fuzz::targets::net_guest_frames(data);
});
