//! What the supervisor's event loop takes ([`Event`]) and the VM's phase ([`Phase`]): the
//! vocabulary `serve` (the loop) and `sessions` (clients) share, kept apart from both so
//! that neither names the other's internals.

use pen_proto::Frame;
use tokio::task::JoinHandle;

use super::outbox::Outbox;
use super::router::ClientId;
use crate::qmp::QmpEvent;

/// One thing for the event loop, from the tasks around it.
pub(super) enum Event {
    Guest(Frame),
    GuestBad(String),
    GuestClosed,
    ClientConnected(ClientId, Outbox, JoinHandle<()>),
    ClientFrame(ClientId, Frame),
    ClientBad(ClientId, String),
    ClientGone(ClientId),
    /// QEMU's monitor said something ([`crate::qmp`]; floods are thinned there).
    Qmp(QmpEvent),
}

/// Where the VM is in its life. It only moves forward: see [`Phase::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// QEMU runs; the guest has not said `Ready`.
    Booting,
    /// Sessions are served.
    Ready,
    /// Shutting down; no new session starts.
    Stopping,
}

impl Phase {
    /// Whether the VM may go from `self` to `next`.
    pub fn can_become(self, next: Phase) -> bool {
        matches!(
            (self, next),
            (Phase::Booting, Phase::Ready)
                | (Phase::Booting, Phase::Stopping)
                | (Phase::Ready, Phase::Stopping)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        use Phase::*;
        let all = [Booting, Ready, Stopping];
        let allowed = [(Booting, Ready), (Booting, Stopping), (Ready, Stopping)];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }
}
