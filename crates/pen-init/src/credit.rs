//! A session's windows on the guest side (see [`pen_proto::window`]): the output credit the
//! host grants (shared by the agent, which receives the grants, and the session's output
//! task, which spends them) and the stdin window the agent checks and grants back.

use std::sync::Mutex;

use pen_proto::{Credit, Inbound, WindowError};
use tokio::sync::Notify;

/// What the session may still send of its stdout + stderr, and whether it was ended.
#[derive(Default)]
pub struct OutputCredit {
    state: Mutex<(Credit, bool)>,
    changed: Notify,
}

impl OutputCredit {
    /// Bytes that may be sent now; `None` once the session was closed.
    pub fn available(&self) -> Option<usize> {
        let state = self.state.lock().unwrap();
        (!state.1).then(|| state.0.available())
    }

    /// Waits until some credit is available; `None` once the session was closed.
    pub async fn wait(&self) -> Option<usize> {
        loop {
            // Taken before looking, so a grant in between still wakes us.
            let changed = self.changed.notified();
            match self.available() {
                Some(0) => changed.await,
                other => return other,
            }
        }
    }

    /// Records `n` bytes sent; the caller never sends more than [`Self::available`].
    pub fn spend(&self, n: usize) {
        let mut state = self.state.lock().unwrap();
        let _ = state.0.spend(n);
    }

    /// A grant from the host. Err: it granted more than it was sent.
    pub fn grant(&self, n: u32) -> Result<(), WindowError> {
        self.state.lock().unwrap().0.grant(n)?;
        self.changed.notify_one();
        Ok(())
    }

    /// Ends the session: a waiting [`Self::wait`] returns `None`.
    pub fn close(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_one();
    }
}

/// The session's stdin window: checked as bytes arrive, granted back as they are written.
#[derive(Default)]
pub struct StdinWindow(Mutex<Inbound>);

impl StdinWindow {
    /// `n` bytes of stdin arrived. Err: the host overran the window.
    pub fn receive(&self, n: usize) -> Result<(), WindowError> {
        self.0.lock().unwrap().receive(n)
    }

    /// `n` bytes were written to the process (or discarded); the grant to send, if due.
    pub fn consumed(&self, n: usize) -> Option<u32> {
        self.0.lock().unwrap().consumed(n)
    }

    /// Every consumed byte not yet granted: for when the input runs dry.
    pub fn flush(&self) -> Option<u32> {
        self.0.lock().unwrap().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pen_proto::WINDOW;
    use std::sync::Arc;

    #[tokio::test]
    async fn output_waits_for_a_grant_and_stops_when_closed() {
        let credit = Arc::new(OutputCredit::default());
        assert_eq!(credit.wait().await, Some(WINDOW as usize));
        credit.spend(WINDOW as usize);
        assert_eq!(credit.available(), Some(0));
        let waiter = tokio::spawn({
            let credit = credit.clone();
            async move { credit.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no credit: the sender waits");
        credit.grant(4096).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(4096));
        assert!(credit.grant(WINDOW).is_err(), "more than was sent");

        credit.spend(4096);
        let waiter = tokio::spawn({
            let credit = credit.clone();
            async move { credit.wait().await }
        });
        tokio::task::yield_now().await;
        credit.close();
        assert_eq!(waiter.await.unwrap(), None);
    }

    #[test]
    fn stdin_window_checks_and_grants() {
        let w = StdinWindow::default();
        w.receive(WINDOW as usize).unwrap();
        assert!(w.receive(1).is_err());
        assert_eq!(w.consumed(100), None);
        assert_eq!(w.flush(), Some(100));
        w.receive(100).unwrap();
    }
}
