//! Client sessions and frame relaying: the supervisor's side of each `pen shell` / `pen exec`
//! connection (greeting, `Exec`, routing frames between a client and its guest session,
//! hang-up) and the tasks that move frames over the sockets. The VM's lifecycle and the
//! event loop that drives these handlers are in `serve.rs`.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use pen_proto::{Frame, FrameCodec, Message, CLIENT_SESSION, CONTROL, PROTOCOL_VERSION};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::guest_queue::GuestQueue;
use super::outbox::{Full, Outbox, MAX_QUEUED};
use super::router::ClientId;
use super::serve::{End, Event, Phase, Sup};
use super::Report;

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

impl Sup<'_> {
    pub(super) fn on_client(&mut self, id: ClientId, frame: Frame) -> Option<End> {
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
                let phase = self.phase;
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
                        self.send_notes(id);
                    }
                    Phase::Stopping => {
                        self.send_client(id, Frame::control(Message::Shutdown { force: false }))
                    }
                    Phase::Booting => {}
                }
            }
            (CONTROL, Message::Shutdown { force }) => {
                if self.phase != Phase::Stopping {
                    return Some(End::Shutdown { force });
                }
            }
            (CONTROL, Message::KeepRunning) => {
                eprintln!("supervisor: keeping the VM running");
                self.keep_running = true;
            }
            (CLIENT_SESSION, Message::Exec(request)) => {
                if self.phase != Phase::Ready {
                    let why = match self.phase {
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

    /// Queues a frame for a client. A client whose queue is full has stopped reading while
    /// its guest session floods it with tiny frames (see [`Outbox`]): it is dropped, and its
    /// session hung up, rather than let the supervisor's memory grow. Boot progress lines to
    /// such a client are skipped instead.
    pub(super) fn send_client(&mut self, id: ClientId, frame: Frame) {
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

    /// Ends a client's connection with an error.
    pub(super) fn refuse(&mut self, id: ClientId, why: String) {
        eprintln!("supervisor: refusing client {id}: {why}");
        self.send_client(id, Frame::new(CLIENT_SESSION, Message::Error(why)));
        self.drop_client(id);
    }

    /// Forgets a client; its session in the guest, if still running, is hung up.
    pub(super) fn drop_client(&mut self, id: ClientId) {
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
            let tx = self.agent_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(HANGUP_GRACE).await;
                tx.push(Frame::new(guest_id, Message::Signal(libc::SIGKILL)));
            });
        }
        if self.clients.is_empty() {
            self.idle_since = Instant::now();
        }
    }

    /// Tells the spawner and every waiting client that the boot failed.
    pub(super) fn fail_waiters(&mut self, msg: &str) {
        self.reporter.send(&Report::Error(msg.to_string()));
        self.reporter.close();
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.send_client(
                id,
                Frame::new(CLIENT_SESSION, Message::Error(msg.to_string())),
            );
        }
    }

    /// Ends every connection: sessions still open learn that the VM stopped; clients see
    /// EOF once their queued frames are written (`pen stop` waits for exactly that).
    pub(super) async fn disconnect_all(&mut self) {
        let msg = format!("VM {} stopped", self.name);
        for id in self.router.drain() {
            self.send_client(id, Frame::new(CLIENT_SESSION, Message::Error(msg.clone())));
        }
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
