//! Feature `capture` (never in pen's normal build): with `PEN_NET_CAPTURE_DIR` set, each
//! `Backend::serve` writes the frames it exchanged with the guest to
//! `net-<pid>-<n>.bin` in that directory, for seeding the fuzz corpora (`fuzz/`).
//! Records: `[kind u8: 0 from the guest, 1 to the guest][len u16 BE][Ethernet frame]`,
//! the input format of the `net_guest_frames` fuzz target (less its policy byte).

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

pub const FROM_GUEST: u8 = 0;
pub const TO_GUEST: u8 = 1;

/// The capture file of one serve, if capturing.
#[derive(Clone)]
pub struct Capture(Arc<Mutex<std::fs::File>>);

impl Capture {
    pub fn start() -> Option<Capture> {
        static SERVES: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::var_os("PEN_NET_CAPTURE_DIR")?;
        let n = SERVES.fetch_add(1, Ordering::Relaxed);
        let path = std::path::Path::new(&dir).join(format!("net-{}-{n}.bin", std::process::id()));
        let file = std::fs::File::create(&path).ok()?;
        Some(Capture(Arc::new(Mutex::new(file))))
    }

    fn record(&self, kind: u8, frame: &[u8]) {
        let Ok(len) = u16::try_from(frame.len()) else {
            return;
        };
        let mut rec = vec![kind];
        rec.extend_from_slice(&len.to_be_bytes());
        rec.extend_from_slice(frame);
        let _ = self.0.lock().unwrap().write_all(&rec);
    }

    /// A channel whose frames are recorded as `kind`, then passed on to `next`.
    pub fn tap(&self, kind: u8, next: mpsc::Sender<Vec<u8>>) -> mpsc::Sender<Vec<u8>> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let capture = self.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                capture.record(kind, &frame);
                if next.send(frame).await.is_err() {
                    return;
                }
            }
        });
        tx
    }
}
