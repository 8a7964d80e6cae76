//! Client sessions and frame relaying: the supervisor's side of each `pen shell` / `pen exec`
//! connection (greeting, `Exec`, routing frames between a client and its guest session,
//! hang-up) and the tasks that move frames over the sockets, behind an interface of their
//! own ([`Sessions`]): the VM's lifecycle and the event loop that drives it (`serve.rs`)
//! pass in the VM's [`Phase`] and get back what a client asked of the VM ([`Request`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use pen_proto::{Frame, FrameCodec, Message, CLIENT_SESSION, CONTROL, PROTOCOL_VERSION};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::event::{Event, Phase};
use super::guest_queue::GuestQueue;
use super::outbox::{Full, Outbox, MAX_QUEUED};
use super::router::{ClientId, FromGuest, Router};

/// Time a hung-up session's process gets between SIGHUP and SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// A connected client.
pub(super) struct Client {
    pub outbox: Outbox,
    pub writer: JoinHandle<()>,
    pub hello: bool,
    /// Said Hello and waits for `Ready` (gets boot `Log` lines meanwhile).
    pub waiting: bool,
}

/// What a client asked of the VM as a whole, for the supervisor to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Request {
    Shutdown { force: bool },
    KeepRunning,
}

/// The VM's clients and their sessions: who is connected, which guest session is whose
/// (the [`Router`]), and the guest link they share. The supervisor tells it the VM's
/// [`Phase`]; it answers clients itself and hands back only what concerns the VM
/// ([`Request`]).
pub(super) struct Sessions {
    name: String,
    guest: GuestQueue,
    clients: HashMap<ClientId, Client>,
    router: Router,
    /// Since when no client has been connected (or since the VM became ready).
    idle_since: Instant,
    /// A client connected after the VM became ready: from then on, no clients = stop.
    had_client: bool,
}

impl Sessions {
    pub fn new(name: &str, guest: GuestQueue) -> Sessions {
        Sessions {
            name: name.to_string(),
            guest,
            clients: HashMap::new(),
            router: Router::default(),
            idle_since: Instant::now(),
            had_client: false,
        }
    }

    /// Queues a frame for the guest link (never waits).
    pub fn send_guest(&self, frame: Frame) {
        self.guest.push(frame);
    }

    /// No more frames for the guest: its writer ends once the queue is written.
    pub fn close_guest(&self) {
        self.guest.close();
    }

    pub fn ids(&self) -> Vec<ClientId> {
        self.clients.keys().copied().collect()
    }

    /// When the VM, without clients, should stop: `grace` after it became ready when no
    /// client ever came, at once when the last one left. `None` while a client is here.
    pub fn idle_deadline(&self, grace: std::time::Duration) -> Option<Instant> {
        if !self.clients.is_empty() {
            return None;
        }
        Some(if self.had_client {
            self.idle_since
        } else {
            self.idle_since + grace
        })
    }

    /// Nobody is here for the VM: while it boots, no client waits for `Ready`; once it is
    /// ready, no client has come and none is connected.
    pub fn unattended(&self, phase: Phase) -> bool {
        match phase {
            Phase::Booting => !self.clients.values().any(|c| c.waiting),
            Phase::Ready => !self.had_client && self.clients.is_empty(),
            Phase::Stopping => false,
        }
    }

    pub fn connected(
        &mut self,
        id: ClientId,
        outbox: Outbox,
        writer: JoinHandle<()>,
        phase: Phase,
    ) {
        if phase == Phase::Ready {
            self.had_client = true;
        }
        self.clients.insert(
            id,
            Client {
                outbox,
                writer,
                hello: false,
                waiting: false,
            },
        );
    }

    /// A frame from client `id`. `notes`: lines a client that greets a ready VM is told.
    pub fn on_client(
        &mut self,
        id: ClientId,
        frame: Frame,
        phase: Phase,
        notes: &[String],
    ) -> Option<Request> {
        let client = self.clients.get_mut(&id)?;
        if !client.hello && !matches!(frame.message, Message::Hello { .. }) {
            self.refuse(id, "the first message must be Hello".into());
            return None;
        }
        match (frame.session, frame.message) {
            (CONTROL, Message::Hello { version, .. }) => {
                if version != PROTOCOL_VERSION {
                    self.refuse(
                        id,
                        format!("this VM's supervisor speaks protocol {PROTOCOL_VERSION}, the client {version}; stop the VM and retry"),
                    );
                    return None;
                }
                client.hello = true;
                client.waiting = phase == Phase::Booting;
                self.send_client(
                    id,
                    Frame::control(Message::Hello {
                        version: PROTOCOL_VERSION,
                        software: format!("pen {}", pen_core::VERSION),
                    }),
                );
                match phase {
                    Phase::Ready => {
                        self.send_client(id, Frame::control(Message::Ready));
                        for text in notes {
                            let text = text.clone();
                            self.send_client(id, Frame::control(Message::Log { text }));
                        }
                    }
                    Phase::Stopping => {
                        self.send_client(id, Frame::control(Message::Shutdown { force: false }))
                    }
                    Phase::Booting => {}
                }
            }
            (CONTROL, Message::Shutdown { force }) => {
                if phase != Phase::Stopping {
                    return Some(Request::Shutdown { force });
                }
            }
            (CONTROL, Message::KeepRunning) => return Some(Request::KeepRunning),
            (CLIENT_SESSION, Message::Exec(request)) => {
                if phase != Phase::Ready {
                    let why = match phase {
                        Phase::Stopping => format!("VM {} is stopping", self.name),
                        _ => format!("VM {} is not ready yet", self.name),
                    };
                    self.send_client(id, Frame::new(CLIENT_SESSION, Message::Error(why)));
                    return None;
                }
                match self.router.open(id) {
                    Some(guest_id) => {
                        self.send_guest(Frame::new(guest_id, Message::Exec(request)));
                    }
                    None => self.send_client(
                        id,
                        Frame::new(
                            CLIENT_SESSION,
                            Message::Error("one session per connection".into()),
                        ),
                    ),
                }
            }
            (
                CLIENT_SESSION,
                message @ (Message::Stdin(_)
                | Message::Resize(_)
                | Message::Signal(_)
                | Message::Window(_)),
            ) => match self.router.route_to_guest(id, message) {
                Ok(Some(frame)) => self.send_guest(frame),
                Ok(None) => {}
                Err(e) => self.refuse(id, format!("session window: {e}")),
            },
            (session, message) => {
                self.refuse(
                    id,
                    format!("unexpected {} on session {session}", message.kind()),
                );
            }
        }
        None
    }

    /// A frame the guest sent on a session (not CONTROL). Never waits: a client's queue is
    /// bounded by its session's window, which the router enforces, and by its outbox, so a
    /// stalled client stalls only its own guest process.
    pub fn on_guest(&mut self, frame: Frame) {
        match self.router.route_from_guest(frame) {
            FromGuest::Client(client, frame) => self.send_client(client, frame),
            FromGuest::Guest(frame) => self.send_guest(frame),
            FromGuest::Broken {
                client,
                session,
                error,
            } => {
                eprintln!("supervisor: guest session {session} broke the protocol: {error}");
                self.send_guest(Frame::new(session, Message::Signal(libc::SIGKILL)));
                self.send_client(
                    client,
                    Frame::new(
                        CLIENT_SESSION,
                        Message::Error(format!("the guest broke the session's protocol: {error}")),
                    ),
                );
            }
            FromGuest::Drop => {}
        }
    }

    /// A line for the user: to the clients waiting for the VM to boot (`waiting_only`), or
    /// to every client (they print it on stderr).
    pub fn log(&mut self, text: &str, waiting_only: bool) {
        let ids: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.waiting || !waiting_only)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let text = text.to_string();
            self.send_client(id, Frame::control(Message::Log { text }));
        }
    }

    /// The VM is ready: the clients waiting for it hear so.
    pub fn ready(&mut self) {
        self.idle_since = Instant::now();
        let waiting: Vec<ClientId> = self
            .clients
            .iter_mut()
            .filter(|(_, c)| c.waiting)
            .map(|(&id, c)| {
                c.waiting = false;
                id
            })
            .collect();
        if !waiting.is_empty() {
            self.had_client = true;
        }
        for id in waiting {
            self.send_client(id, Frame::control(Message::Ready));
        }
    }

    /// The VM is stopping: every client hears it.
    pub fn stopping(&mut self, force: bool) {
        for id in self.ids() {
            self.send_client(id, Frame::control(Message::Shutdown { force }));
        }
    }

    /// Queues a frame for a client. A client whose queue is full has stopped reading while
    /// its guest session floods it with tiny frames (see [`Outbox`]): it is dropped, and its
    /// session hung up, rather than let the supervisor's memory grow. Boot progress lines to
    /// such a client are skipped instead.
    pub fn send_client(&mut self, id: ClientId, frame: Frame) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let is_log = matches!(frame.message, Message::Log { .. });
        if c.outbox.push(frame) == Err(Full) && !is_log {
            eprintln!(
                "supervisor: client {id} is not reading and its queue passed {} MiB; dropping it",
                MAX_QUEUED >> 20
            );
            self.drop_client(id);
        }
    }

    /// A client sent a frame that could not be decoded.
    pub fn malformed(&mut self, id: ClientId, reason: &str) {
        self.send_client(
            id,
            Frame::new(
                CLIENT_SESSION,
                Message::Error(format!("malformed frame: {reason}")),
            ),
        );
        self.drop_client(id);
    }

    /// Ends a client's connection with an error.
    pub fn refuse(&mut self, id: ClientId, why: String) {
        eprintln!("supervisor: refusing client {id}: {why}");
        self.send_client(id, Frame::new(CLIENT_SESSION, Message::Error(why)));
        self.drop_client(id);
    }

    /// Forgets a client; its session in the guest, if still running, is hung up.
    pub fn drop_client(&mut self, id: ClientId) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        client.outbox.close();
        if let Some((guest_id, unconsumed)) = self.router.close_client(id) {
            // What the client never read is dropped with it: the guest may send that much
            // again (to be discarded) and so reach its exit.
            if let Some(n) = unconsumed {
                self.send_guest(Frame::new(guest_id, Message::Window(n)));
            }
            self.send_guest(Frame::new(guest_id, Message::Signal(libc::SIGHUP)));
            let guest = self.guest.clone();
            tokio::spawn(async move {
                tokio::time::sleep(HANGUP_GRACE).await;
                guest.push(Frame::new(guest_id, Message::Signal(libc::SIGKILL)));
            });
        }
        if self.clients.is_empty() {
            self.idle_since = Instant::now();
        }
    }

    /// Tells every client an error (a failed boot).
    pub fn fail_all(&mut self, msg: &str) {
        for id in self.ids() {
            self.send_client(
                id,
                Frame::new(CLIENT_SESSION, Message::Error(msg.to_string())),
            );
        }
    }

    /// The guest is gone: every client with a running session gets `msg`.
    pub fn sessions_lost(&mut self, msg: &str) {
        for client in self.router.drain() {
            self.send_client(
                client,
                Frame::new(CLIENT_SESSION, Message::Error(msg.to_string())),
            );
        }
    }

    /// Ends every connection: sessions still open learn that the VM stopped; clients see
    /// EOF once their queued frames are written (`pen stop` waits for exactly that).
    pub async fn disconnect_all(&mut self) {
        let msg = format!("VM {} stopped", self.name);
        self.sessions_lost(&msg);
        let writers: Vec<JoinHandle<()>> = self
            .clients
            .drain()
            .map(|(_, c)| {
                c.outbox.close();
                c.writer
            })
            .collect();
        let _ =
            tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(writers)).await;
    }
}

pub(super) async fn accept_loop(listener: UnixListener, events: Sender<Event>) {
    let mut next_id: ClientId = 1;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("supervisor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let (r, w) = stream.into_split();
        let outbox = Outbox::new();
        let writer = tokio::spawn(write_outbox(w, outbox.clone()));
        if events
            .send(Event::ClientConnected(id, outbox, writer))
            .await
            .is_err()
        {
            return;
        }
        tokio::spawn(read_client(id, r, events.clone()));
    }
}

/// The guest link's writer: everything queued in one flush.
pub(super) async fn write_frames(w: OwnedWriteHalf, queue: GuestQueue) {
    let mut sink = FramedWrite::new(w, FrameCodec::new());
    while let Some(frames) = queue.take().await {
        for frame in frames {
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// A client's writer: everything queued in one flush, until the outbox is closed.
async fn write_outbox(w: OwnedWriteHalf, outbox: Outbox) {
    let mut sink = FramedWrite::new(w, FrameCodec::new());
    while let Some(frames) = outbox.take().await {
        for frame in frames {
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

async fn read_client(id: ClientId, r: OwnedReadHalf, events: Sender<Event>) {
    let mut stream = FramedRead::new(r, FrameCodec::new());
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(Ok(frame)) => Event::ClientFrame(id, frame),
            Ok(Err(bad)) => Event::ClientBad(id, bad.to_string()),
            Err(_) => break,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
    let _ = events.send(Event::ClientGone(id)).await;
}

pub(super) async fn read_guest(
    mut stream: FramedRead<OwnedReadHalf, FrameCodec>,
    events: Sender<Event>,
) {
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(Ok(frame)) => Event::Guest(frame),
            Ok(Err(bad)) => Event::GuestBad(bad.to_string()),
            Err(e) => {
                eprintln!("supervisor: agent link: {e}");
                break;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
    let _ = events.send(Event::GuestClosed).await;
}
