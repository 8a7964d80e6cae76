//! Session ids between the two links. A client connection is one session and always uses
//! [`CLIENT_SESSION`]; on the guest link the supervisor gives each session a fresh id,
//! never reused, so a late frame of an ended session can never reach a newer one.

use std::collections::HashMap;

use pen_proto::{Frame, Message, SessionId, CLIENT_SESSION, CONTROL};

pub type ClientId = u64;

#[derive(Debug)]
pub struct Router {
    next: SessionId,
    by_guest: HashMap<SessionId, ClientId>,
    by_client: HashMap<ClientId, SessionId>,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            next: CONTROL + 1,
            by_guest: HashMap::new(),
            by_client: HashMap::new(),
        }
    }
}

impl Router {
    /// Opens a guest session for `client`; `None` if it already has one (one per connection).
    pub fn open(&mut self, client: ClientId) -> Option<SessionId> {
        if self.by_client.contains_key(&client) {
            return None;
        }
        let id = self.next;
        // Wrapping past u32::MAX would take 4 billion sessions; skip CONTROL all the same.
        self.next = self.next.checked_add(1).unwrap_or(CONTROL + 1);
        self.by_guest.insert(id, client);
        self.by_client.insert(client, id);
        Some(id)
    }

    /// The guest-side frame for a message `client` sent on its session.
    pub fn route_to_guest(&self, client: ClientId, message: Message) -> Option<Frame> {
        self.by_client
            .get(&client)
            .map(|&id| Frame::new(id, message))
    }

    /// Where a guest frame goes, rewritten for the client. `Exit` and `Error` end the session.
    pub fn route_from_guest(&mut self, frame: Frame) -> Option<(ClientId, Frame)> {
        let client = *self.by_guest.get(&frame.session)?;
        if matches!(frame.message, Message::Exit(_) | Message::Error(_)) {
            self.close_guest(frame.session);
        }
        Some((client, Frame::new(CLIENT_SESSION, frame.message)))
    }

    fn close_guest(&mut self, id: SessionId) -> Option<ClientId> {
        let client = self.by_guest.remove(&id)?;
        self.by_client.remove(&client);
        Some(client)
    }

    /// Forgets `client`'s session; returns its guest id when it was still running.
    pub fn close_client(&mut self, client: ClientId) -> Option<SessionId> {
        let id = self.by_client.remove(&client)?;
        self.by_guest.remove(&id);
        Some(id)
    }

    /// Every client with a running session, and forgets them all (the guest is gone).
    pub fn drain(&mut self) -> Vec<ClientId> {
        self.by_guest.clear();
        self.by_client.drain().map(|(c, _)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pen_proto::ExitStatus;

    #[test]
    fn ids_are_rewritten_both_ways() {
        let mut r = Router::default();
        let a = r.open(10).unwrap();
        let b = r.open(11).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, CONTROL);
        assert_eq!(r.open(10), None, "one session per connection");
        assert_eq!(
            r.route_to_guest(11, Message::Stdin(b"x".to_vec())),
            Some(Frame::new(b, Message::Stdin(b"x".to_vec())))
        );
        assert_eq!(r.route_to_guest(12, Message::Signal(2)), None);
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(b"hi".to_vec()))),
            Some((
                10,
                Frame::new(CLIENT_SESSION, Message::Stdout(b"hi".to_vec()))
            ))
        );
    }

    #[test]
    fn exit_ends_the_session_and_late_frames_are_dropped() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        let exit = Message::Exit(ExitStatus::Exited(3));
        assert_eq!(
            r.route_from_guest(Frame::new(a, exit.clone())),
            Some((1, Frame::new(CLIENT_SESSION, exit)))
        );
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![1]))),
            None
        );
        assert_eq!(r.close_client(1), None, "nothing left to hang up");
        // A new session of the same client never reuses the old id.
        let b = r.open(1).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn disconnect_reports_the_running_session() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        let _b = r.open(2).unwrap();
        assert_eq!(r.close_client(1), Some(a));
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![1]))),
            None
        );
        assert_eq!(r.drain(), vec![2]);
        assert!(r.drain().is_empty());
    }
}
