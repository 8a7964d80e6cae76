//! Session ids between the two links. A client connection is one session and always uses
//! [`CLIENT_SESSION`]; on the guest link the supervisor gives each session a fresh id,
//! never reused, so a late frame of an ended session can never reach a newer one.
//!
//! The router also holds each session's windows (see [`pen_proto::window`]) as the relay
//! sees them: it forwards grants unchanged, and a peer that sends beyond its credit (or
//! grants what it never received) breaks its session instead of growing the supervisor's
//! queues. A session's output queued for its client is thus never more than one window.

use std::collections::HashMap;

use pen_proto::{Credit, Frame, Message, SessionId, WindowError, CLIENT_SESSION, CONTROL};

pub type ClientId = u64;

/// One guest session's route and windows.
#[derive(Debug)]
struct Route {
    client: ClientId,
    /// What the guest may still send of stdout + stderr.
    output: Credit,
    /// What the client may still send of stdin.
    input: Credit,
}

#[derive(Debug)]
pub struct Router {
    next: SessionId,
    by_guest: HashMap<SessionId, Route>,
    by_client: HashMap<ClientId, SessionId>,
    /// Guest sessions whose client hung up, until their `Exit`: their output is discarded
    /// and its credit returned at once, so the process is never stuck on a window that no
    /// client will reopen. Each holds the guest's output credit.
    orphans: HashMap<SessionId, Credit>,
}

/// What to do with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum FromGuest {
    /// Forward to this client.
    Client(ClientId, Frame),
    /// Answer the guest (the window of a hung-up session's discarded output).
    Guest(Frame),
    /// The guest broke the session's window: the session is closed here; tell the client,
    /// kill the guest session.
    Broken {
        client: ClientId,
        session: SessionId,
        error: WindowError,
    },
    /// Nothing to do.
    Drop,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            next: CONTROL + 1,
            by_guest: HashMap::new(),
            by_client: HashMap::new(),
            orphans: HashMap::new(),
        }
    }
}

/// Bytes of session data a message carries (what windows count).
fn data_len(message: &Message) -> Option<usize> {
    match message {
        Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) => Some(d.len()),
        _ => None,
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
        self.by_guest.insert(
            id,
            Route {
                client,
                output: Credit::new(),
                input: Credit::new(),
            },
        );
        self.by_client.insert(client, id);
        Some(id)
    }

    /// The guest-side frame for a message `client` sent on its session; `Ok(None)` when it
    /// has none. Err: the client broke a window (its stdin beyond its credit, or a grant of
    /// output it never received); nothing was forwarded.
    pub fn route_to_guest(
        &mut self,
        client: ClientId,
        message: Message,
    ) -> Result<Option<Frame>, WindowError> {
        let Some(&id) = self.by_client.get(&client) else {
            return Ok(None);
        };
        let route = self
            .by_guest
            .get_mut(&id)
            .expect("routes are kept both ways");
        match &message {
            Message::Stdin(d) => route.input.spend(d.len())?,
            Message::Window(n) => route.output.grant(*n)?,
            _ => {}
        }
        Ok(Some(Frame::new(id, message)))
    }

    /// Where a guest frame goes, rewritten for the client. `Exit` and `Error` end the session.
    pub fn route_from_guest(&mut self, frame: Frame) -> FromGuest {
        let id = frame.session;
        if let Some(credit) = self.orphans.get_mut(&id) {
            return match &frame.message {
                Message::Exit(_) | Message::Error(_) => {
                    self.orphans.remove(&id);
                    FromGuest::Drop
                }
                message => match data_len(message) {
                    Some(0) | None => FromGuest::Drop,
                    Some(n) => match credit.spend(n) {
                        Ok(()) => {
                            credit.grant(n as u32).expect("just spent");
                            FromGuest::Guest(Frame::new(id, Message::Window(n as u32)))
                        }
                        Err(_) => {
                            // A guest that ignores windows gets no more help ending.
                            self.orphans.remove(&id);
                            FromGuest::Drop
                        }
                    },
                },
            };
        }
        let Some(route) = self.by_guest.get_mut(&id) else {
            return FromGuest::Drop;
        };
        let client = route.client;
        let checked = match &frame.message {
            Message::Stdout(d) | Message::Stderr(d) => route.output.spend(d.len()),
            Message::Window(n) => route.input.grant(*n),
            _ => Ok(()),
        };
        if let Err(error) = checked {
            self.close_guest(id);
            return FromGuest::Broken {
                client,
                session: id,
                error,
            };
        }
        if matches!(frame.message, Message::Exit(_) | Message::Error(_)) {
            self.close_guest(id);
        }
        FromGuest::Client(client, Frame::new(CLIENT_SESSION, frame.message))
    }

    fn close_guest(&mut self, id: SessionId) -> Option<ClientId> {
        let route = self.by_guest.remove(&id)?;
        self.by_client.remove(&route.client);
        Some(route.client)
    }

    /// Forgets `client`'s session. When it was still running, returns its guest id and the
    /// output credit to return to the guest at once (what the client never consumed); the
    /// session's further output is discarded until its `Exit`.
    pub fn close_client(&mut self, client: ClientId) -> Option<(SessionId, Option<u32>)> {
        let id = self.by_client.remove(&client)?;
        let route = self.by_guest.remove(&id)?;
        let unconsumed = pen_proto::WINDOW as usize - route.output.available();
        self.orphans.insert(id, Credit::new());
        Some((id, (unconsumed > 0).then_some(unconsumed as u32)))
    }

    /// Every client with a running session, and forgets them all (the guest is gone).
    pub fn drain(&mut self) -> Vec<ClientId> {
        self.by_guest.clear();
        self.orphans.clear();
        self.by_client.drain().map(|(c, _)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pen_proto::{ExitStatus, WINDOW};

    fn to_client(r: &mut Router, frame: Frame) -> Option<(ClientId, Frame)> {
        match r.route_from_guest(frame) {
            FromGuest::Client(c, f) => Some((c, f)),
            _ => None,
        }
    }

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
            Ok(Some(Frame::new(b, Message::Stdin(b"x".to_vec()))))
        );
        assert_eq!(r.route_to_guest(12, Message::Signal(2)), Ok(None));
        assert_eq!(
            to_client(&mut r, Frame::new(a, Message::Stdout(b"hi".to_vec()))),
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
            to_client(&mut r, Frame::new(a, exit.clone())),
            Some((1, Frame::new(CLIENT_SESSION, exit)))
        );
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![1]))),
            FromGuest::Drop
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
        assert_eq!(r.close_client(1), Some((a, None)));
        assert_eq!(r.drain(), vec![2]);
        assert!(r.drain().is_empty());
    }

    /// Output within the window is relayed, grants pass through, one byte more breaks the
    /// session: the supervisor never queues more than a window for a client.
    #[test]
    fn the_guest_output_window_is_enforced() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        let chunk = vec![0u8; WINDOW as usize / 2];
        for _ in 0..2 {
            assert!(to_client(&mut r, Frame::new(a, Message::Stdout(chunk.clone()))).is_some());
        }
        // The client consumed 1000 bytes: its grant goes to the guest as is.
        assert_eq!(
            r.route_to_guest(1, Message::Window(1000)),
            Ok(Some(Frame::new(a, Message::Window(1000))))
        );
        assert!(to_client(&mut r, Frame::new(a, Message::Stderr(vec![0; 1000]))).is_some());
        match r.route_from_guest(Frame::new(a, Message::Stdout(vec![0]))) {
            FromGuest::Broken {
                client: 1,
                session,
                error: WindowError::Overrun { sent: 1, credit: 0 },
            } => assert_eq!(session, a),
            other => panic!("expected a broken session, got {other:?}"),
        }
        assert_eq!(r.route_to_guest(1, Message::Window(1)), Ok(None), "closed");
    }

    #[test]
    fn the_client_stdin_window_is_enforced() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        r.route_to_guest(1, Message::Stdin(vec![0; WINDOW as usize]))
            .unwrap();
        assert!(r.route_to_guest(1, Message::Stdin(vec![0])).is_err());
        // End of input carries no bytes: always allowed.
        assert!(r.route_to_guest(1, Message::Stdin(Vec::new())).is_ok());
        // The guest wrote 10 bytes to the process: the grant reaches the client.
        assert_eq!(
            to_client(&mut r, Frame::new(a, Message::Window(10))),
            Some((1, Frame::new(CLIENT_SESSION, Message::Window(10))))
        );
        assert!(r.route_to_guest(1, Message::Stdin(vec![0; 10])).is_ok());
        // Granting output never sent is a client error too.
        assert!(r.route_to_guest(1, Message::Window(1)).is_err());
    }

    #[test]
    fn a_guest_granting_unsent_stdin_breaks_its_session() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        assert!(matches!(
            r.route_from_guest(Frame::new(a, Message::Window(1))),
            FromGuest::Broken { client: 1, .. }
        ));
    }

    /// A hung-up session gets back the credit its client never consumed, then each
    /// discarded chunk's, until its Exit.
    #[test]
    fn a_hung_up_session_drains_to_its_exit() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        to_client(&mut r, Frame::new(a, Message::Stdout(vec![0; 5000]))).unwrap();
        r.route_to_guest(1, Message::Window(1000)).unwrap();
        assert_eq!(r.close_client(1), Some((a, Some(4000))));
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![0; 700]))),
            FromGuest::Guest(Frame::new(a, Message::Window(700)))
        );
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Exit(ExitStatus::Exited(0)))),
            FromGuest::Drop
        );
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![0; 700]))),
            FromGuest::Drop,
            "forgotten after its exit"
        );
    }
}
