//! The frames waiting to be written to the guest link, bounded against a hostile client.
//!
//! What a client sends toward the guest is bounded by the session's windows for data
//! (`Stdin`, `Window`), but `Resize` and `Signal` carry no data: a client could send them as
//! fast as it can write while the guest reads slowly (a busy or stopped guest), and every
//! one would wait here. So they coalesce while queued, the way a terminal and a kernel treat
//! them: a `Resize` replaces the session's queued one (only the latest size matters), and a
//! `Signal` already queued for the session is not queued twice (standard signals do not
//! queue either). A session can then hold at most one `Resize` and one of each signal
//! number here, however fast its client sends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use pen_proto::{Frame, Message, SessionId};
use tokio::sync::Notify;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    /// Index in `frames` of each session's queued `Resize`.
    resizes: HashMap<SessionId, usize>,
    /// The signals queued, by session.
    signals: HashSet<(SessionId, i32)>,
    closed: bool,
}

/// Shared between the supervisor (which pushes, never waiting) and the link's writer task
/// (which takes everything queued at once). Clones share the queue.
#[derive(Clone, Default)]
pub struct GuestQueue {
    queue: Arc<Mutex<Queue>>,
    ready: Arc<Notify>,
}

impl GuestQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `frame` for the guest, coalescing `Resize` and `Signal` (see the module doc).
    pub fn push(&self, frame: Frame) {
        let mut q = self.queue.lock().expect("guest queue lock");
        if q.closed {
            return;
        }
        match frame.message {
            Message::Resize(size) => {
                if let Some(&at) = q.resizes.get(&frame.session) {
                    q.frames[at].message = Message::Resize(size);
                    return;
                }
                let at = q.frames.len();
                q.resizes.insert(frame.session, at);
            }
            // Already queued for this session: once is enough.
            Message::Signal(n) if !q.signals.insert((frame.session, n)) => return,
            _ => {}
        }
        q.frames.push_back(frame);
        drop(q);
        self.ready.notify_one();
    }

    /// Everything queued, waiting until there is something; `None` once closed and empty.
    pub async fn take(&self) -> Option<Vec<Frame>> {
        loop {
            {
                let mut q = self.queue.lock().expect("guest queue lock");
                if !q.frames.is_empty() {
                    q.resizes.clear();
                    q.signals.clear();
                    return Some(q.frames.drain(..).collect());
                }
                if q.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// No more frames: the writer ends once it has written what is queued.
    pub fn close(&self) {
        self.queue.lock().expect("guest queue lock").closed = true;
        self.ready.notify_one();
    }

    /// How many frames wait.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.lock().expect("guest queue lock").frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pen_proto::WindowSize;

    fn resize(session: SessionId, cols: u16) -> Frame {
        Frame::new(session, Message::Resize(WindowSize { rows: 24, cols }))
    }

    /// The hostile client: a million resizes and signals while the guest reads nothing. The
    /// queue holds one resize (the latest) and one of each signal, in their first places.
    #[tokio::test]
    async fn a_flood_of_resizes_and_signals_queues_one_of_each() {
        let q = GuestQueue::new();
        q.push(Frame::new(7, Message::Stdin(b"ls\n".to_vec())));
        for i in 0..1_000_000u32 {
            q.push(resize(7, (i % 500) as u16 + 1));
            q.push(Frame::new(7, Message::Signal(libc::SIGINT)));
            q.push(Frame::new(
                7,
                Message::Signal(libc::SIGWINCH + (i % 2) as i32),
            ));
        }
        q.push(resize(8, 80));
        assert_eq!(
            q.len(),
            6,
            "stdin, a resize, three signals, session 8's resize"
        );
        let frames = q.take().await.unwrap();
        assert_eq!(frames[0].message, Message::Stdin(b"ls\n".to_vec()));
        assert!(
            matches!(&frames[1].message, Message::Resize(s) if s.cols == 500),
            "the latest size: {:?}",
            frames[1]
        );
        assert_eq!(frames[2].message, Message::Signal(libc::SIGINT));
        assert_eq!(frames[5], resize(8, 80));
        // Once taken (written), the next resize and signal queue again.
        q.push(resize(7, 100));
        q.push(Frame::new(7, Message::Signal(libc::SIGINT)));
        assert_eq!(q.take().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn other_frames_keep_their_order_and_close_ends_the_writer() {
        let q = GuestQueue::new();
        for i in 0..3u8 {
            q.push(Frame::new(7, Message::Stdin(vec![i])));
        }
        let frames = q.take().await.unwrap();
        let data: Vec<_> = frames
            .iter()
            .map(|f| match &f.message {
                Message::Stdin(d) => d[0],
                _ => 255,
            })
            .collect();
        assert_eq!(data, vec![0, 1, 2]);
        q.push(Frame::new(7, Message::Signal(libc::SIGTERM)));
        q.close();
        assert_eq!(q.take().await.unwrap().len(), 1);
        assert!(q.take().await.is_none());
        q.push(Frame::new(7, Message::Signal(libc::SIGTERM)));
        assert!(q.take().await.is_none(), "nothing is queued after close");
    }
}
