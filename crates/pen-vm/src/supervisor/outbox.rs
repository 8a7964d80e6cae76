//! The frames waiting to be written to one client, with the memory they hold bounded.
//!
//! Windows bound a session's queued *bytes* (see [`super::router`]), but not its frames: a
//! guest that writes its window one byte per frame would queue four million frames, each
//! costing far more than its byte, for a client that is not reading (stopped with Ctrl-Z,
//! piped into a slow reader). The outbox merges a data frame into the one queued before it
//! when both are the same stream of the same session, so a byte-at-a-time writer costs what
//! its bytes cost, and counts what it holds; past [`MAX_QUEUED`] it refuses the frame and
//! the caller drops that client (or, for boot progress lines, that line).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use pen_proto::{Frame, Message, WINDOW};
use tokio::sync::Notify;

/// What a queued frame costs beyond its data: the `Frame` itself and its allocation.
const FRAME_OVERHEAD: usize = std::mem::size_of::<Frame>() + 32;

/// Data frames are merged up to this size (a socket write's worth).
const MERGE_UP_TO: usize = 256 * 1024;

/// The most one client's queue may hold: its session's output window twice over (stdout and
/// stderr interleaved frame by frame cannot merge) plus room for control frames. Reached only
/// by a client that stopped reading while its guest writes tiny alternating frames.
pub const MAX_QUEUED: usize = 4 * WINDOW as usize;

/// The client's queue is over [`MAX_QUEUED`]; the frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    cost: usize,
    closed: bool,
}

/// Shared between the supervisor's event loop (which pushes) and the client's writer task
/// (which takes). Cloning shares the queue.
#[derive(Clone, Default)]
pub struct Outbox {
    queue: Arc<Mutex<Queue>>,
    ready: Arc<Notify>,
}

fn cost(frame: &Frame) -> usize {
    FRAME_OVERHEAD + frame.message.data_len().unwrap_or(0)
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `frame`, merged into the last one where it can be. Never waits.
    pub fn push(&self, frame: Frame) -> Result<(), Full> {
        let mut q = self.queue.lock().expect("outbox lock");
        if q.closed {
            return Ok(());
        }
        let merged = match (q.frames.back_mut(), &frame.message) {
            (Some(last), Message::Stdout(more)) | (Some(last), Message::Stderr(more))
                if last.session == frame.session =>
            {
                match (&mut last.message, &frame.message) {
                    (Message::Stdout(data), Message::Stdout(_))
                    | (Message::Stderr(data), Message::Stderr(_))
                        if data.len() + more.len() <= MERGE_UP_TO =>
                    {
                        data.extend_from_slice(more);
                        Some(more.len())
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match merged {
            Some(n) => q.cost += n,
            None => {
                let c = cost(&frame);
                if q.cost + c > MAX_QUEUED {
                    return Err(Full);
                }
                q.cost += c;
                q.frames.push_back(frame);
            }
        }
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// Everything queued, waiting until there is something; `None` once closed and empty.
    pub async fn take(&self) -> Option<Vec<Frame>> {
        loop {
            {
                let mut q = self.queue.lock().expect("outbox lock");
                if !q.frames.is_empty() {
                    q.cost = 0;
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
        self.queue.lock().expect("outbox lock").closed = true;
        self.ready.notify_one();
    }

    /// Bytes the queue holds, as [`MAX_QUEUED`] counts them.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.lock().unwrap().cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pen_proto::CLIENT_SESSION;

    fn stdout(data: &[u8]) -> Frame {
        Frame::new(CLIENT_SESSION, Message::Stdout(data.to_vec()))
    }

    #[test]
    fn a_byte_at_a_time_writer_costs_its_bytes() {
        let outbox = Outbox::new();
        for _ in 0..WINDOW {
            outbox.push(stdout(b"x")).unwrap();
        }
        // Merged into frames of MERGE_UP_TO bytes: the overhead is a few frames' worth.
        let frames = WINDOW as usize / MERGE_UP_TO;
        assert_eq!(outbox.queued(), WINDOW as usize + frames * FRAME_OVERHEAD);
    }

    #[test]
    fn order_and_content_survive_merging() {
        let outbox = Outbox::new();
        outbox.push(stdout(b"ab")).unwrap();
        outbox.push(stdout(b"c")).unwrap();
        outbox
            .push(Frame::new(CLIENT_SESSION, Message::Stderr(b"E".to_vec())))
            .unwrap();
        outbox.push(stdout(b"d")).unwrap();
        outbox
            .push(Frame::new(CLIENT_SESSION, Message::Window(5)))
            .unwrap();
        outbox.push(stdout(b"e")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let frames = rt.block_on(outbox.take()).unwrap();
        let messages: Vec<Message> = frames.into_iter().map(|f| f.message).collect();
        assert_eq!(
            messages,
            vec![
                Message::Stdout(b"abc".to_vec()),
                Message::Stderr(b"E".to_vec()),
                Message::Stdout(b"d".to_vec()),
                Message::Window(5),
                Message::Stdout(b"e".to_vec()),
            ]
        );
        assert_eq!(outbox.queued(), 0, "taken");
    }

    /// The hostile case merging cannot help: stdout and stderr alternating byte by byte for
    /// a client that never reads. The queue stops at its bound instead of growing.
    #[test]
    fn alternating_tiny_frames_hit_the_bound() {
        let outbox = Outbox::new();
        let mut refused = false;
        for i in 0..WINDOW {
            let message = if i % 2 == 0 {
                Message::Stdout(vec![0])
            } else {
                Message::Stderr(vec![0])
            };
            if outbox.push(Frame::new(CLIENT_SESSION, message)) == Err(Full) {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(outbox.queued() <= MAX_QUEUED);
    }

    #[test]
    fn take_ends_after_close_once_drained() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let outbox = Outbox::new();
        outbox.push(stdout(b"last")).unwrap();
        outbox.close();
        assert_eq!(rt.block_on(outbox.take()).unwrap().len(), 1);
        assert_eq!(rt.block_on(outbox.take()), None);
    }
}
