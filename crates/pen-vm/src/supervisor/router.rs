//! Session ids between the two links. A client connection is one session and always uses
//! [`CLIENT_SESSION`]; on the guest link the supervisor gives each session a fresh id,
//! never reused, so a late frame of an ended session can never reach a newer one.
//!
//! The router also holds each session's windows (see [`pen_proto::window`]) as the relay
//! sees them: it forwards grants, and a peer that sends beyond its credit (or grants what it
//! never received) breaks its session instead of growing the supervisor's queues.
//!
//! The guest is hostile, so what it may send on a session is narrow: one `Started`, data
//! within the window, grants, and one `Exit` or `Error`. Anything else breaks the session.
//! Grants from the guest are batched here (as the agent batches its own), so a guest that
//! grants byte by byte, or sends empty grants, cannot make the supervisor queue a frame per
//! byte for a client that is not reading. The same holds toward the guest for the grants
//! the router makes itself for a hung-up session's discarded output.

use std::collections::HashMap;

use pen_proto::{
    Credit, Frame, Message, SessionId, WindowError, CLIENT_SESSION, CONTROL, GRANT_THRESHOLD,
    WINDOW,
};

pub type ClientId = u64;

/// One guest session's route and windows.
#[derive(Debug)]
struct Route {
    client: ClientId,
    /// What the guest may still send of stdout + stderr.
    output: Credit,
    /// What the client may still send of stdin, as far as the guest has granted it.
    input: Credit,
    /// Stdin credit the guest granted that the client has not been told of yet.
    input_granted: u32,
    /// The guest said `Started`.
    started: bool,
}

#[derive(Debug)]
pub struct Router {
    next: SessionId,
    by_guest: HashMap<SessionId, Route>,
    by_client: HashMap<ClientId, SessionId>,
    /// Guest sessions whose client hung up, until their `Exit`: their output is discarded
    /// and its credit returned, so the process is never stuck on a window that no client
    /// will reopen. Each holds the guest's output credit.
    orphans: HashMap<SessionId, Credit>,
}

/// How the guest broke a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("sent {0}, which an agent never sends on a session")]
    Unexpected(&'static str),
}

/// What to do with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum FromGuest {
    /// Forward to this client.
    Client(ClientId, Frame),
    /// Answer the guest (the window of a hung-up session's discarded output).
    Guest(Frame),
    /// The guest broke the session's rules: the session is closed here; tell the client,
    /// kill the guest session.
    Broken {
        client: ClientId,
        session: SessionId,
        error: GuestFault,
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
                input_granted: 0,
                started: false,
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
                message => match message.data_len() {
                    Some(0) | None => FromGuest::Drop,
                    Some(n) => match credit.spend(n) {
                        // Discarded at once; given back in batches, and always before the
                        // guest can run out (a batch is smaller than the window).
                        Ok(()) => match WINDOW - credit.available() as u32 {
                            outstanding if outstanding >= GRANT_THRESHOLD => {
                                credit.grant(outstanding).expect("just spent");
                                FromGuest::Guest(Frame::new(id, Message::Window(outstanding)))
                            }
                            _ => FromGuest::Drop,
                        },
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
            Message::Started { .. } if !route.started => {
                route.started = true;
                Ok(())
            }
            // Empty output means nothing; relaying it would let a guest queue frames for free.
            Message::Stdout(d) | Message::Stderr(d) if d.is_empty() => return FromGuest::Drop,
            Message::Stdout(d) | Message::Stderr(d) => {
                route.output.spend(d.len()).map_err(Into::into)
            }
            Message::Window(0) => return FromGuest::Drop,
            Message::Window(n) => match route.input.grant(*n) {
                Ok(()) => {
                    // Pass grants on in batches, or at once when the guest has consumed
                    // everything sent (the client may be waiting for exactly that).
                    route.input_granted += n;
                    let everything = route.input.available() == WINDOW as usize;
                    if route.input_granted < GRANT_THRESHOLD && !everything {
                        return FromGuest::Drop;
                    }
                    let n = std::mem::take(&mut route.input_granted);
                    return FromGuest::Client(
                        client,
                        Frame::new(CLIENT_SESSION, Message::Window(n)),
                    );
                }
                Err(e) => Err(e.into()),
            },
            Message::Exit(_) | Message::Error(_) => Ok(()),
            other => Err(GuestFault::Unexpected(other.kind())),
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
        let unconsumed = WINDOW as usize - route.output.available();
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
    use pen_proto::ExitStatus;

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
                error: GuestFault::Window(WindowError::Overrun { sent: 1, credit: 0 }),
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
        // The guest wrote 10 bytes to the process: a grant that small waits for more.
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Window(10))),
            FromGuest::Drop
        );
        // A batch's worth reaches the client, with what was held back.
        assert_eq!(
            to_client(&mut r, Frame::new(a, Message::Window(GRANT_THRESHOLD - 10))),
            Some((
                1,
                Frame::new(CLIENT_SESSION, Message::Window(GRANT_THRESHOLD))
            ))
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
        // Discarded output is given back in batches, before the guest could run dry.
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![0; 700]))),
            FromGuest::Drop
        );
        let rest = GRANT_THRESHOLD as usize - 700;
        assert_eq!(
            r.route_from_guest(Frame::new(a, Message::Stdout(vec![0; rest]))),
            FromGuest::Guest(Frame::new(a, Message::Window(GRANT_THRESHOLD)))
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

    /// Everything the guest sent that is not its part of a session breaks the session:
    /// before, a guest could make the supervisor queue any number of `Hello`s, `Log`s or
    /// `Exec`s for a client that was not reading.
    #[test]
    fn a_guest_sending_what_no_agent_sends_breaks_its_session() {
        for message in [
            Message::Hello {
                version: 2,
                software: "x".repeat(1000),
            },
            Message::Log { text: "x".into() },
            Message::Exec(Default::default()),
            Message::Stdin(vec![1]),
            Message::Signal(9),
            Message::Ready,
        ] {
            let mut r = Router::default();
            let a = r.open(1).unwrap();
            let kind = message.kind();
            assert_eq!(
                r.route_from_guest(Frame::new(a, message)),
                FromGuest::Broken {
                    client: 1,
                    session: a,
                    error: GuestFault::Unexpected(kind)
                }
            );
        }
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        assert!(to_client(&mut r, Frame::new(a, Message::Started { pid: 1 })).is_some());
        assert!(matches!(
            r.route_from_guest(Frame::new(a, Message::Started { pid: 1 })),
            FromGuest::Broken { .. }
        ));
    }

    #[test]
    fn empty_and_byte_sized_grants_from_the_guest_are_batched() {
        let mut r = Router::default();
        let a = r.open(1).unwrap();
        r.route_to_guest(1, Message::Stdin(vec![0; WINDOW as usize]))
            .unwrap();
        for _ in 0..1000 {
            assert_eq!(
                r.route_from_guest(Frame::new(a, Message::Window(0))),
                FromGuest::Drop
            );
            assert_eq!(
                r.route_from_guest(Frame::new(a, Message::Window(1))),
                FromGuest::Drop
            );
        }
    }

    /// Fuzzing the router from the hostile guest's side (and a client that never reads):
    /// whatever frames the guest sends, on whatever sessions, nothing panics and what is
    /// queued for each client stays within a bound that does not grow with the number of
    /// frames: at most a window of data plus one frame per batch of grants and per session
    /// event.
    mod fuzz {
        use super::*;
        use pen_proto::testing;
        use proptest::collection::vec;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            Guest(Frame),
            /// A burst of identical frames (floods are where bounds break).
            GuestBurst(Frame, u16),
            ClientStdin(ClientId, usize),
            ClientGone(ClientId),
            Open(ClientId),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => testing::frame().prop_map(Step::Guest),
                2 => (testing::frame(), 1u16..2000).prop_map(|(f, n)| Step::GuestBurst(f, n)),
                1 => (0u64..3, 0usize..(2 * WINDOW as usize)).prop_map(|(c, n)| Step::ClientStdin(c, n)),
                1 => (0u64..3).prop_map(Step::ClientGone),
                1 => (0u64..3).prop_map(Step::Open),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn a_hostile_guest_cannot_grow_a_stalled_clients_queue(
                steps in vec(step(), 0..64),
            ) {
                let mut r = Router::default();
                for c in 0..3 {
                    r.open(c);
                }
                // Per client: frames and data bytes queued (never read), stdin sent.
                let mut frames = HashMap::<ClientId, usize>::new();
                let mut bytes = HashMap::<ClientId, usize>::new();
                let mut stdin_sent = HashMap::<ClientId, usize>::new();
                let mut to_guest = 0usize;
                for step in steps {
                    let (frame, times) = match step {
                        Step::Guest(f) => (f, 1),
                        Step::GuestBurst(f, n) => (f, n),
                        Step::ClientStdin(c, n) => {
                            if let Ok(Some(_)) = r.route_to_guest(c, Message::Stdin(vec![0; n])) {
                                *stdin_sent.entry(c).or_default() += n;
                            }
                            continue;
                        }
                        Step::ClientGone(c) => {
                            r.close_client(c);
                            continue;
                        }
                        Step::Open(c) => {
                            r.open(c);
                            continue;
                        }
                    };
                    for _ in 0..times {
                        match r.route_from_guest(frame.clone()) {
                            FromGuest::Client(c, f) => {
                                prop_assert_eq!(f.session, CLIENT_SESSION);
                                *frames.entry(c).or_default() += 1;
                                *bytes.entry(c).or_default() += f.message.data_len().unwrap_or(0);
                            }
                            FromGuest::Guest(f) => {
                                prop_assert!(matches!(f.message, Message::Window(n) if n >= GRANT_THRESHOLD));
                                to_guest += 1;
                            }
                            FromGuest::Broken { client, .. } => {
                                *frames.entry(client).or_default() += 1;
                            }
                            FromGuest::Drop => {}
                        }
                    }
                }
                // Sessions per client are bounded by the Open steps (at most 64 here).
                let sessions = 64 + 3;
                for (c, n) in frames {
                    let data = bytes.get(&c).copied().unwrap_or(0);
                    let stdin = stdin_sent.get(&c).copied().unwrap_or(0);
                    // Windows of data, and per session: Started, Exit/Error or a break,
                    // plus grants (one per batch of stdin, one per full catch-up).
                    prop_assert!(data <= sessions * WINDOW as usize);
                    let grants_bound = stdin / GRANT_THRESHOLD as usize + sessions;
                    // Each data frame relayed holds at least one byte.
                    prop_assert!(
                        n <= data + 3 * sessions + grants_bound,
                        "client {c}: {n} frames queued for {data} data bytes and {stdin} stdin bytes"
                    );
                }
                prop_assert!(to_guest <= 64 * 2000 * 8192 / GRANT_THRESHOLD as usize + 1);
            }
        }
    }
}
