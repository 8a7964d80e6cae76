//! Feature `capture` (never in pen's normal build): with `PEN_PROTO_CAPTURE_DIR` set, every
//! frame this process decodes or encodes is appended, as it is on the wire, to
//! `proto-<pid>-decoded.bin` or `proto-<pid>-encoded.bin` there: the supervisor's
//! decoded file holds what the guest agent (and clients) sent, its encoded one what the
//! host sent. Seeds for the agent-link fuzz targets (`fuzz/`).

use std::io::Write;
use std::sync::{Mutex, OnceLock};

fn file(
    which: &'static str,
    cell: &'static OnceLock<Option<Mutex<std::fs::File>>>,
) -> Option<&'static Mutex<std::fs::File>> {
    cell.get_or_init(|| {
        let dir = std::env::var_os("PEN_PROTO_CAPTURE_DIR")?;
        let path =
            std::path::Path::new(&dir).join(format!("proto-{}-{which}.bin", std::process::id()));
        std::fs::File::create(path).ok().map(Mutex::new)
    })
    .as_ref()
}

/// Records one frame body (session id + payload) with its length prefix.
pub fn record(decoded: bool, body: &[u8]) {
    static DECODED: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    static ENCODED: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    let f = if decoded {
        file("decoded", &DECODED)
    } else {
        file("encoded", &ENCODED)
    };
    if let Some(f) = f {
        let mut rec = (body.len() as u32).to_be_bytes().to_vec();
        rec.extend_from_slice(body);
        let _ = f.lock().unwrap().write_all(&rec);
    }
}
