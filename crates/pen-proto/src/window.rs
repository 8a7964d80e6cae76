//! Flow control: the credit accounting of a session's windows, shared by the guest agent,
//! the supervisor and the client. Pure logic, no I/O.
//!
//! Each session has two windows, one per direction: output (the process's stdout and stderr
//! together, guest → client) and input (stdin, client → guest). A sender starts with
//! [`WINDOW`] bytes of credit and spends it on every data byte it sends
//! ([`Message::Stdout`](crate::Message::Stdout), `Stderr`, `Stdin`); the receiver hands
//! credit back with [`Message::Window`](crate::Message::Window) once it has *consumed* the
//! bytes (written them to the terminal, to the process's stdin). A sender out of credit stops
//! reading its source, so at most [`WINDOW`] bytes of a session are ever in flight in each
//! direction, whatever the speed of either end.
//!
//! The supervisor relays grants unchanged and keeps a mirror [`Credit`] of each peer, so it
//! can tell a peer that overruns its window (or grants what it never received) and end that
//! session instead of buffering without bound.

/// Bytes a receiver lets its peer have in flight, per session and direction. Both sides
/// start with this much credit; no grant may take a credit above it.
pub const WINDOW: u32 = 4 * 1024 * 1024;

/// Consumed bytes are granted back once this many have accumulated (fewer, larger
/// `Window` frames). Below [`WINDOW`], so a sender never waits on a grant held back here.
pub const GRANT_THRESHOLD: u32 = WINDOW / 4;

/// A peer broke the window rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("sent {sent} bytes with only {credit} bytes of window left")]
    Overrun { sent: usize, credit: u32 },
    #[error("granted {granted} bytes, more than were outstanding ({outstanding})")]
    OverGrant { granted: u32, outstanding: u32 },
}

/// What a sender may still send, as the sender itself or a relay or receiver that checks
/// it sees it: starts at [`WINDOW`], [`Credit::spend`] takes, [`Credit::grant`] gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    available: u32,
}

impl Default for Credit {
    fn default() -> Self {
        Credit { available: WINDOW }
    }
}

impl Credit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> usize {
        self.available as usize
    }

    /// Spends `n` bytes. Err (credit unchanged): `n` is more than is left.
    pub fn spend(&mut self, n: usize) -> Result<(), WindowError> {
        match u32::try_from(n) {
            Ok(m) if m <= self.available => {
                self.available -= m;
                Ok(())
            }
            _ => Err(WindowError::Overrun {
                sent: n,
                credit: self.available,
            }),
        }
    }

    /// Adds a grant. Err (credit unchanged): the credit would exceed [`WINDOW`], i.e. the
    /// peer granted bytes that were never sent to it.
    pub fn grant(&mut self, n: u32) -> Result<(), WindowError> {
        let outstanding = WINDOW - self.available;
        if n > outstanding {
            return Err(WindowError::OverGrant {
                granted: n,
                outstanding,
            });
        }
        self.available += n;
        Ok(())
    }
}

/// The receiving end of a window: checks the peer stays within its credit and batches the
/// grants of consumed bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The peer's credit, as this side sees it.
    peer: Credit,
    /// Consumed bytes not yet granted back.
    pending: u32,
}

impl Inbound {
    pub fn new() -> Self {
        Self::default()
    }

    /// `n` bytes arrived. Err: the peer sent more than its window; the session must end.
    pub fn receive(&mut self, n: usize) -> Result<(), WindowError> {
        self.peer.spend(n)
    }

    /// `n` received bytes were consumed; returns the grant to send now, if one is due.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        // Never more than was received: clamp rather than trust the caller's count.
        let outstanding = WINDOW - self.peer.available - self.pending;
        self.pending += u32::try_from(n).unwrap_or(u32::MAX).min(outstanding);
        if self.pending >= GRANT_THRESHOLD {
            self.flush()
        } else {
            None
        }
    }

    /// Grants every consumed byte now (e.g. when nothing more will be read soon).
    pub fn flush(&mut self) -> Option<u32> {
        let n = std::mem::take(&mut self.pending);
        if n == 0 {
            return None;
        }
        self.peer
            .grant(n)
            .expect("pending never exceeds what was received");
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_spent_and_granted_within_the_window() {
        let mut c = Credit::new();
        assert_eq!(c.available(), WINDOW as usize);
        c.spend(1000).unwrap();
        assert_eq!(c.available(), WINDOW as usize - 1000);
        assert_eq!(
            c.spend(WINDOW as usize),
            Err(WindowError::Overrun {
                sent: WINDOW as usize,
                credit: WINDOW - 1000
            })
        );
        assert_eq!(
            c.available(),
            WINDOW as usize - 1000,
            "unchanged by a refusal"
        );
        c.spend(WINDOW as usize - 1000).unwrap();
        assert_eq!(c.available(), 0);
        assert!(c.spend(1).is_err());
        c.spend(0).unwrap();
        c.grant(10).unwrap();
        assert_eq!(c.available(), 10);
    }

    #[test]
    fn a_grant_beyond_what_was_sent_is_refused() {
        let mut c = Credit::new();
        assert_eq!(
            c.grant(1),
            Err(WindowError::OverGrant {
                granted: 1,
                outstanding: 0
            })
        );
        c.spend(100).unwrap();
        assert!(c.grant(101).is_err());
        assert!(c.grant(u32::MAX).is_err());
        c.grant(100).unwrap();
        assert_eq!(c.available(), WINDOW as usize);
    }

    #[test]
    fn huge_sends_are_overruns_not_truncations() {
        let mut c = Credit::new();
        assert!(c.spend(usize::MAX).is_err());
        assert!(c.spend(u32::MAX as usize + 1).is_err());
        assert_eq!(c.available(), WINDOW as usize);
    }

    #[test]
    fn inbound_batches_grants_and_catches_overruns() {
        let mut r = Inbound::new();
        r.receive(GRANT_THRESHOLD as usize - 1).unwrap();
        assert_eq!(r.consumed(GRANT_THRESHOLD as usize - 1), None, "batched");
        r.receive(1).unwrap();
        assert_eq!(r.consumed(1), Some(GRANT_THRESHOLD));
        assert_eq!(r.flush(), None, "nothing pending");
        // The rest of the window, then one byte too many.
        r.receive(WINDOW as usize).unwrap();
        assert!(r.receive(1).is_err());
        assert_eq!(r.consumed(5), None);
        assert_eq!(r.flush(), Some(5));
        r.receive(5).unwrap();
        assert!(r.receive(1).is_err());
    }

    #[test]
    fn inbound_never_grants_more_than_it_received() {
        let mut r = Inbound::new();
        r.receive(10).unwrap();
        assert_eq!(r.consumed(1 << 30), None);
        assert_eq!(r.flush(), Some(10));
        assert_eq!(r.consumed(10), None);
        assert_eq!(r.flush(), None);
    }

    /// A sender and a receiver exchanging data through a lagging consumer never exceed
    /// the window and never deadlock.
    #[test]
    fn sender_and_receiver_keep_flowing() {
        let mut tx = Credit::new();
        let mut rx = Inbound::new();
        let mut in_flight = 0usize;
        let mut delivered = 0usize;
        for step in 0..10_000 {
            let n = tx.available().min(64 * 1024);
            tx.spend(n).unwrap();
            rx.receive(n).unwrap();
            in_flight += n;
            assert!(in_flight <= WINDOW as usize);
            // The consumer takes a varying bite of what is waiting.
            let bite = in_flight.min(1 + (step * 7919) % (96 * 1024));
            in_flight -= bite;
            delivered += bite;
            if let Some(g) = rx.consumed(bite) {
                tx.grant(g).unwrap();
            }
        }
        assert!(delivered > 100 * WINDOW as usize);
    }

    /// A hostile peer drives the receiving end with any sequence of sends, consumptions and
    /// flushes: nothing panics, the peer never gets more than [`WINDOW`] in flight, and no
    /// grant ever returns more than was received.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Receive(usize),
            Consume(usize),
            Flush,
        }

        fn op() -> impl Strategy<Value = Op> {
            let size = prop_oneof![
                0usize..=70_000,
                Just(GRANT_THRESHOLD as usize),
                any::<usize>()
            ];
            prop_oneof![
                size.clone().prop_map(Op::Receive),
                size.prop_map(Op::Consume),
                Just(Op::Flush),
            ]
        }

        proptest! {
            #[test]
            fn inbound_holds_its_window_whatever_the_peer_does(
                ops in proptest::collection::vec(op(), 0..200),
            ) {
                let mut rx = Inbound::new();
                let mut received = 0u64;
                let mut granted = 0u64;
                for op in ops {
                    match op {
                        Op::Receive(n) => {
                            if rx.receive(n).is_ok() {
                                received += n as u64;
                            }
                        }
                        Op::Consume(n) => granted += rx.consumed(n).unwrap_or(0) as u64,
                        Op::Flush => granted += rx.flush().unwrap_or(0) as u64,
                    }
                    prop_assert!(granted <= received);
                    prop_assert!(received - granted <= WINDOW as u64);
                }
            }
        }
    }
}
