//! QEMU's monitor (QMP), held for the VM's whole life.
//!
//! One task owns the connection ([`Qmp::handshake`] starts it). Commands reach it as typed
//! methods ([`Qmp::stop`], [`Qmp::query_status`], [`Qmp::migrate_to_fd`], ...), each sent with
//! an `id` and answered by the reply carrying it; the events QEMU sends between replies are
//! parsed into [`QmpEvent`]s and handed to whoever took [`Qmp::take_events`] (the
//! supervisor's event loop). A [`Qmp`] is a cheap handle: clones share the one connection
//! (QEMU serves one client per monitor socket), so a task of its own (a checkpoint, a poll of
//! balloon statistics) can issue commands without holding up the event loop, and nothing on
//! a session's path ever waits for QEMU.
//!
//! The guest chooses how many I/O errors its disks produce, and QEMU reports each as an
//! event: the connection task passes on at most one [`QmpEvent::BlockIoError`] per device,
//! operation and kind a second ([`IO_ERROR_EVERY`]), so a flood costs neither memory nor the
//! event loop's time.
//!
//! Hand-rolled rather than typed through the `qapi` crate: its generated types follow a newer
//! QEMU schema than the 7.2 we support (`migrate`, `device_add` and `blockdev-add` changed
//! shape since), while the handful of commands pen sends are easiest to read as plain JSON.
//!
//! Sockets and files QEMU needs after it started (a migration stream, the virtiofsd socket
//! of a hot-plugged workspace, a cold boot's volume files) are handed to it as file
//! descriptors ([`Qmp::pass_fd`], QMP `getfd`; [`Qmp::add_fd`], QMP `add-fd`) rather than as
//! paths: pen's runtime directory is private, and a QEMU that has
//! dropped root (see `qemu::runas`) could not open them.

use std::collections::{BTreeMap, HashMap};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

/// How long one command may take to be answered. Commands pen sends return at once
/// (migrations run in the background and are polled), so this only catches a wedged QEMU.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest line taken from QEMU; its answers to pen's commands are a few KiB.
const MAX_LINE: usize = 1 << 20;
/// At most one [`QmpEvent::BlockIoError`] per device, operation and kind passes this often.
pub const IO_ERROR_EVERY: Duration = Duration::from_secs(1);

/// Why a QMP command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected QMP greeting: {0}")]
    Greeting(String),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("QMP {command} got no answer within {REPLY_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("QMP {command} failed: {desc}")]
    Failed {
        command: String,
        class: String,
        desc: String,
    },
    #[error("unexpected QMP reply to {command}: {reply}")]
    Unexpected { command: String, reply: String },
    #[error("sending QMP {command}: {source}")]
    Send {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("duplicating a descriptor for QMP {command}: {source}")]
    Dup {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// An event QEMU sent, as far as pen acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// A guest request to a block device failed on the host and was handled per the
    /// device's error policy (pen's overlay disk: `report`, the guest gets an I/O error).
    BlockIoError(BlockIoError),
    /// QEMU is shutting down; `guest`: the guest asked for it (power off, reboot).
    Shutdown { guest: bool, reason: String },
    /// The VM's CPUs stopped (a `stop`, a migration's end, an error policy of `stop`).
    Stop,
    /// The VM's CPUs run again.
    Resume,
    /// Any other event, by name.
    Other(String),
}

/// The data of a `BLOCK_IO_ERROR` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockIoError {
    /// The drive's id (`-drive id=...`); empty for a node without a device name.
    #[serde(default)]
    pub device: String,
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// `read` or `write`.
    pub operation: String,
    /// What QEMU did: `report`, `ignore` or `stop`.
    pub action: String,
    /// The host said ENOSPC: its file system is full.
    #[serde(default)]
    pub nospace: bool,
    /// The host's error text, e.g. "No space left on device".
    #[serde(default)]
    pub reason: String,
}

impl BlockIoError {
    /// The host file system is full (or the user's quota spent). QEMU sets `nospace` only
    /// for drives whose error policy stops the VM (`blk_iostatus_is_enabled`); with pen's
    /// `werror=report` the host's error text is what tells (QEMU's messages are not
    /// translated: it never sets `LC_MESSAGES`).
    pub fn host_disk_full(&self) -> bool {
        self.nospace
            || self.reason == "No space left on device"
            || self.reason == "Disk quota exceeded"
    }
}

/// `query-status`: whether the guest's CPUs run, and QEMU's name for its state
/// (`running`, `paused`, `inmigrate`, `postmigrate`, `io-error`, `shutdown`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunState {
    pub running: bool,
    pub status: String,
}

/// Where a migration (a save, or a load with `-incoming defer`) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    /// Not started, or still running (QEMU's status word).
    Running(String),
    Completed,
    /// `failed` or `cancelled`, with QEMU's reason.
    Failed(String),
}

/// Balloon statistics as the guest reports them (`qom-get` of `guest-stats`): the guest
/// chooses every value, so they are figures to show, never to act on blindly.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct BalloonStats {
    /// Seconds since the epoch of the guest's last update; 0: never.
    #[serde(rename = "last-update", default)]
    pub last_update: i64,
    /// `stat-free-memory`, `stat-total-memory`, `stat-available-memory`, ...; -1 unknown.
    #[serde(default)]
    pub stats: BTreeMap<String, i64>,
}

impl BalloonStats {
    /// One statistic in bytes (or a count), `None` when the guest did not report it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.stats.get(name).and_then(|&v| u64::try_from(v).ok())
    }
}

/// One command for the connection task.
struct Request {
    command: String,
    arguments: Value,
    /// Travels with the command as `SCM_RIGHTS` (QEMU keeps its own copy).
    fd: Option<OwnedFd>,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// A handle on a QMP connection; clones share it. The connection closes when the last
/// handle is dropped (or QEMU goes away).
#[derive(Clone)]
pub struct Qmp {
    requests: mpsc::UnboundedSender<Request>,
    events: Arc<Mutex<Option<mpsc::UnboundedReceiver<QmpEvent>>>>,
}

impl Qmp {
    /// Connects to the monitor socket and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Qmp::handshake(stream).await
    }

    /// Takes over a fresh connection to the monitor socket: reads the greeting, starts the
    /// connection task and negotiates capabilities. Needs a tokio runtime.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (r, w) = stream.into_split();
        let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE));
        let greeting = tokio::time::timeout(REPLY_TIMEOUT, lines.next())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
            })?;
        let greeting = match greeting {
            Some(Ok(line)) => line,
            _ => return Err(QmpError::Closed),
        };
        match serde_json::from_str::<Value>(&greeting) {
            Ok(v) if v.get("QMP").is_some() => {}
            _ => return Err(QmpError::Greeting(greeting)),
        }
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(serve(lines, w, requests_rx, events_tx));
        let qmp = Qmp {
            requests,
            events: Arc::new(Mutex::new(Some(events))),
        };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// The event stream, once: the first caller gets it. Events are kept from the
    /// handshake on until it is taken.
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<QmpEvent>> {
        self.events.lock().expect("qmp events lock").take()
    }

    /// Runs `command` with `arguments` (a JSON object) and returns its `return` value. The
    /// typed methods below cover what pen sends; this is for command lists built elsewhere
    /// (`qemu::hotplug_commands`).
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.request(command, arguments, None).await
    }

    async fn request(
        &self,
        command: &str,
        arguments: Value,
        fd: Option<OwnedFd>,
    ) -> Result<Value, QmpError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                command: command.to_string(),
                arguments,
                fd,
                reply,
            })
            .map_err(|_| QmpError::Closed)?;
        match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_string(),
            }),
            // The connection task ended without answering: QEMU closed the socket.
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    async fn request_with_fd(
        &self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        let fd = fd.try_clone_to_owned().map_err(|source| QmpError::Dup {
            command: command.to_string(),
            source,
        })?;
        self.request(command, arguments, Some(fd)).await.map(drop)
    }

    /// Hands QEMU a duplicate of `fd` under `name` (QMP `getfd`, the descriptor travelling
    /// as `SCM_RIGHTS` with the command). A command that then names it (`fd:NAME` migration
    /// URIs, a socket address of type `fd`) takes it over.
    pub async fn pass_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.request_with_fd("getfd", json!({ "fdname": name }), fd)
            .await
    }

    /// Adds a duplicate of `fd` to QEMU's fd set `fdset` (QMP `add-fd`): a block node then
    /// opens it as `/dev/fdset/FDSET`, with the access mode `fd` was opened with.
    pub async fn add_fd(&self, fdset: u32, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.request_with_fd("add-fd", json!({ "fdset-id": fdset }), fd)
            .await
    }

    /// Pauses the guest's CPUs (`stop`).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", json!({})).await.map(drop)
    }

    /// Lets the guest's CPUs run again (`cont`).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", json!({})).await.map(drop)
    }

    /// Ends QEMU at once (`quit`): no guest shutdown, nothing flushed by the guest. QEMU
    /// may close the connection before it answers; that counts as done.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", json!({})).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the guest runs, and QEMU's run state.
    pub async fn query_status(&self) -> Result<RunState, QmpError> {
        let v = self.execute("query-status", json!({})).await?;
        decode("query-status", v)
    }

    /// QEMU's version, e.g. "7.2.22 Debian 1:7.2+dfsg-7+deb12u18+b3".
    pub async fn query_version(&self) -> Result<String, QmpError> {
        let v = self.execute("query-version", json!({})).await?;
        Ok(version_string(&v))
    }

    /// Turns a migration capability on or off (`x-ignore-shared`: guest RAM, in a shared
    /// memfd, is not part of the stream).
    pub async fn set_migration_capability(
        &self,
        capability: &str,
        on: bool,
    ) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": capability, "state": on}]}),
        )
        .await
        .map(drop)
    }

    /// The outgoing migration's bandwidth cap (QEMU's default is 32 MiB/s).
    pub async fn set_migration_max_bandwidth(&self, bytes_per_s: u64) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": bytes_per_s }),
        )
        .await
        .map(drop)
    }

    /// Starts saving the VM into the descriptor passed as `fdname` ([`Qmp::pass_fd`]);
    /// poll [`Qmp::query_migrate`] for its end.
    pub async fn migrate_to_fd(&self, fdname: &str) -> Result<(), QmpError> {
        self.execute("migrate", json!({ "uri": format!("fd:{fdname}") }))
            .await
            .map(drop)
    }

    /// Starts loading a VM started with `-incoming defer` from the descriptor `fdname`.
    pub async fn migrate_incoming_fd(&self, fdname: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", json!({ "uri": format!("fd:{fdname}") }))
            .await
            .map(drop)
    }

    /// Where the current migration stands.
    pub async fn query_migrate(&self) -> Result<Migration, QmpError> {
        let info = self.execute("query-migrate", json!({})).await?;
        Ok(migration_status(&info))
    }

    /// The balloon device's statistics (`qom-get` of `guest-stats` on `qom_path`, e.g.
    /// `/machine/peripheral/pen-balloon`). Polling must be on
    /// ([`Qmp::set_balloon_stats_interval`]).
    pub async fn balloon_stats(&self, qom_path: &str) -> Result<BalloonStats, QmpError> {
        let v = self
            .execute(
                "qom-get",
                json!({"path": qom_path, "property": "guest-stats"}),
            )
            .await?;
        decode("qom-get guest-stats", v)
    }

    /// How often the guest updates its balloon statistics, in seconds (0: never).
    pub async fn set_balloon_stats_interval(
        &self,
        qom_path: &str,
        seconds: u32,
    ) -> Result<(), QmpError> {
        self.execute(
            "qom-set",
            json!({"path": qom_path, "property": "guest-stats-polling-interval", "value": seconds}),
        )
        .await
        .map(drop)
    }
}

fn decode<T: serde::de::DeserializeOwned>(command: &str, v: Value) -> Result<T, QmpError> {
    serde_json::from_value(v.clone()).map_err(|_| QmpError::Unexpected {
        command: command.to_string(),
        reply: v.to_string(),
    })
}

/// "7.2.22 Debian 1:7.2+dfsg-7" from a `query-version` answer.
fn version_string(v: &Value) -> String {
    let q = &v["qemu"];
    let mut s = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
    if let Some(package) = v["package"]
        .as_str()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        s.push_str(&format!(" {package}"));
    }
    s
}

fn migration_status(info: &Value) -> Migration {
    match info.get("status").and_then(Value::as_str) {
        Some("completed") => Migration::Completed,
        Some(status @ ("failed" | "cancelled")) => {
            let why = info
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            Migration::Failed(format!("{status}: {why}"))
        }
        Some(other) => Migration::Running(other.to_string()),
        // No migration yet: `query-migrate` answers `{}`.
        None => Migration::Running("none".into()),
    }
}

/// What one line from QEMU is.
#[derive(Debug, PartialEq)]
enum Incoming {
    Event(QmpEvent),
    /// The answer to the command with this id.
    Reply(u64, Result<Value, (String, String)>),
    /// Neither (a reply without our id, or not JSON): logged and dropped.
    Stray(String),
}

fn parse_line(line: &str) -> Incoming {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Incoming::Stray(line.chars().take(200).collect());
    };
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        return Incoming::Event(parse_event(name, data));
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        return Incoming::Stray(line.chars().take(200).collect());
    };
    if let Some(ret) = v.get("return") {
        return Incoming::Reply(id, Ok(ret.clone()));
    }
    if let Some(err) = v.get("error") {
        let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let desc = match text("desc") {
            d if d.is_empty() => "no description".to_string(),
            d => d,
        };
        return Incoming::Reply(id, Err((text("class"), desc)));
    }
    Incoming::Stray(line.chars().take(200).collect())
}

fn parse_event(name: &str, data: Value) -> QmpEvent {
    match name {
        "BLOCK_IO_ERROR" => match serde_json::from_value(data) {
            Ok(e) => QmpEvent::BlockIoError(e),
            Err(_) => QmpEvent::Other(name.to_string()),
        },
        "SHUTDOWN" => QmpEvent::Shutdown {
            guest: data.get("guest").and_then(Value::as_bool).unwrap_or(false),
            reason: data
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        },
        "STOP" => QmpEvent::Stop,
        "RESUME" => QmpEvent::Resume,
        other => QmpEvent::Other(other.to_string()),
    }
}

/// Passes an event on, or not: repeated I/O errors, and any event the guest could repeat
/// at will, at most once per [`IO_ERROR_EVERY`] per kind. State changes always pass.
#[derive(Default)]
struct Throttle {
    last: HashMap<String, Instant>,
}

impl Throttle {
    fn pass(&mut self, event: &QmpEvent, now: Instant) -> bool {
        let key = match event {
            QmpEvent::BlockIoError(e) => format!(
                "io {} {} {} {}",
                e.device,
                e.node_name.as_deref().unwrap_or(""),
                e.operation,
                e.nospace
            ),
            QmpEvent::Other(name) => name.clone(),
            QmpEvent::Shutdown { .. } | QmpEvent::Stop | QmpEvent::Resume => return true,
        };
        match self.last.get(&key) {
            Some(&t) if now.duration_since(t) < IO_ERROR_EVERY => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

fn command_line(command: &str, arguments: Value, id: u64) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({"execute": command, "arguments": arguments, "id": id}))
            .expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// The connection task: writes commands, reads replies and events, until every handle is
/// gone or QEMU closes the socket. Pending commands then fail with [`QmpError::Closed`].
async fn serve(
    mut lines: FramedRead<OwnedReadHalf, LinesCodec>,
    mut writer: OwnedWriteHalf,
    mut requests: mpsc::UnboundedReceiver<Request>,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    let mut pending: HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)> =
        HashMap::new();
    let mut next_id: u64 = 0;
    let mut throttle = Throttle::default();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                next_id += 1;
                let line = command_line(&request.command, request.arguments, next_id);
                match send(&mut writer, &line, request.fd.as_ref()).await {
                    Ok(()) => {
                        pending.insert(next_id, (request.command, request.reply));
                    }
                    Err(source) => {
                        let _ = request.reply.send(Err(QmpError::Send {
                            command: request.command,
                            source,
                        }));
                    }
                }
            }
            line = lines.next() => {
                let line = match line {
                    Some(Ok(line)) => line,
                    Some(Err(e)) => {
                        eprintln!("qmp: connection dropped: {e}");
                        return;
                    }
                    None => return,
                };
                match parse_line(&line) {
                    Incoming::Event(event) => {
                        if throttle.pass(&event, Instant::now()) {
                            // Nobody listening (yet, or any more) is not an error.
                            let _ = events.send(event);
                        }
                    }
                    Incoming::Reply(id, result) => {
                        if let Some((command, reply)) = pending.remove(&id) {
                            let _ = reply.send(result.map_err(|(class, desc)| QmpError::Failed {
                                command,
                                class,
                                desc,
                            }));
                        }
                    }
                    Incoming::Stray(text) => eprintln!("qmp: stray message: {text}"),
                }
            }
        }
    }
}

/// Writes one command line, with `fd` as `SCM_RIGHTS` on its first byte when given.
async fn send(
    writer: &mut OwnedWriteHalf,
    line: &[u8],
    fd: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let Some(fd) = fd else {
        return writer.write_all(line).await;
    };
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let socket = writer.as_ref();
    let sent = loop {
        socket.writable().await?;
        let fds = [fd.as_raw_fd()];
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                socket.as_raw_fd(),
                &[IoSlice::new(line)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // The descriptor went with the first byte; the rest of a short write is plain data.
    writer.write_all(&line[sent..]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream as StdStream;

    /// The monitor side of a connection: reads commands line by line, writes lines.
    struct FakeMonitor {
        reader: BufReader<StdStream>,
        writer: StdStream,
    }

    impl FakeMonitor {
        /// A connected pair: the monitor (greeting sent) and the client's stream.
        fn pair() -> (FakeMonitor, UnixStream) {
            let (ours, theirs) = StdStream::pair().unwrap();
            let mut writer = ours.try_clone().unwrap();
            writer.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            theirs.set_nonblocking(true).unwrap();
            let monitor = FakeMonitor {
                reader: BufReader::new(ours),
                writer,
            };
            (monitor, UnixStream::from_std(theirs).unwrap())
        }

        /// The next command: its name, arguments and id.
        fn command(&mut self) -> (String, Value, u64) {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            (
                v["execute"].as_str().unwrap().to_string(),
                v["arguments"].clone(),
                v["id"].as_u64().unwrap(),
            )
        }

        fn say(&mut self, line: &str) {
            self.writer.write_all(line.as_bytes()).unwrap();
            self.writer.write_all(b"\n").unwrap();
        }

        fn answer(&mut self, id: u64, ret: Value) {
            self.say(&json!({"return": ret, "id": id}).to_string());
        }

        /// Answers `qmp_capabilities`.
        fn negotiate(&mut self) {
            let (command, _, id) = self.command();
            assert_eq!(command, "qmp_capabilities");
            self.answer(id, json!({}));
        }
    }

    fn io_error(nospace: bool) -> String {
        json!({"event": "BLOCK_IO_ERROR", "timestamp": {"seconds": 1, "microseconds": 2},
               "data": {"device": "pen-overlay", "node-name": "#block123", "operation": "write",
                        "action": "report", "nospace": nospace,
                        "reason": "No space left on device"}})
        .to_string()
    }

    #[test]
    fn lines_are_replies_by_id_events_or_strays() {
        assert_eq!(
            parse_line(r#"{"return": {"status": "completed"}, "id": 7}"#),
            Incoming::Reply(7, Ok(json!({"status": "completed"})))
        );
        assert_eq!(
            parse_line(
                r#"{"error": {"class": "GenericError", "desc": "Bus 'rp9' not found"}, "id": 3}"#
            ),
            Incoming::Reply(
                3,
                Err(("GenericError".into(), "Bus 'rp9' not found".into()))
            )
        );
        assert!(matches!(
            parse_line(r#"{"return": {}}"#),
            Incoming::Stray(_)
        ));
        assert!(matches!(parse_line("not json"), Incoming::Stray(_)));
        assert_eq!(
            parse_line(&io_error(true)),
            Incoming::Event(QmpEvent::BlockIoError(BlockIoError {
                device: "pen-overlay".into(),
                node_name: Some("#block123".into()),
                operation: "write".into(),
                action: "report".into(),
                nospace: true,
                reason: "No space left on device".into(),
            }))
        );
        assert_eq!(
            parse_line(
                r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#
            ),
            Incoming::Event(QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        // As QEMU 7.2 sent it for pen's overlay disk (werror=report) on a full tmpfs: no
        // `nospace` key; the reason tells.
        match parse_line(
            r##"{"timestamp": {"seconds": 1764901711, "microseconds": 5}, "event": "BLOCK_IO_ERROR", "data": {"device": "pen-overlay", "node-name": "#block334", "reason": "No space left on device", "operation": "write", "action": "report"}}"##,
        ) {
            Incoming::Event(QmpEvent::BlockIoError(e)) => {
                assert!(!e.nospace);
                assert!(e.host_disk_full());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_line(r#"{"event": "RESUME"}"#),
            Incoming::Event(QmpEvent::Resume)
        );
        assert_eq!(
            parse_line(r#"{"event": "RTC_CHANGE", "data": {"offset": 1}}"#),
            Incoming::Event(QmpEvent::Other("RTC_CHANGE".into()))
        );
    }

    #[test]
    fn io_errors_pass_once_a_second_per_kind_state_changes_always() {
        let mut t = Throttle::default();
        let now = Instant::now();
        let full = match parse_line(&io_error(true)) {
            Incoming::Event(e) => e,
            other => panic!("{other:?}"),
        };
        let eio = match parse_line(&io_error(false)) {
            Incoming::Event(e) => e,
            other => panic!("{other:?}"),
        };
        assert!(t.pass(&full, now));
        assert!(!t.pass(&full, now + Duration::from_millis(500)));
        assert!(
            t.pass(&eio, now + Duration::from_millis(500)),
            "another kind"
        );
        assert!(t.pass(&full, now + IO_ERROR_EVERY));
        for _ in 0..3 {
            assert!(t.pass(&QmpEvent::Stop, now));
            assert!(t.pass(&QmpEvent::Resume, now));
        }
    }

    #[test]
    fn versions_and_migration_states() {
        let v = json!({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7"});
        assert_eq!(version_string(&v), "7.2.22 Debian 1:7.2+dfsg-7");
        let v = json!({"qemu": {"major": 8, "minor": 0, "micro": 0}, "package": ""});
        assert_eq!(version_string(&v), "8.0.0");
        assert_eq!(
            migration_status(&json!({"status": "completed"})),
            Migration::Completed
        );
        assert_eq!(
            migration_status(&json!({"status": "failed", "error-desc": "disk"})),
            Migration::Failed("failed: disk".into())
        );
        assert_eq!(
            migration_status(&json!({"status": "active"})),
            Migration::Running("active".into())
        );
        assert_eq!(
            migration_status(&json!({})),
            Migration::Running("none".into())
        );
    }

    /// Typed commands go out with ids; events before a reply reach the event stream (a flood
    /// of I/O errors as one); an error reply names the command.
    #[tokio::test]
    async fn commands_replies_and_events_against_a_fake_monitor() {
        let (mut monitor, stream) = FakeMonitor::pair();
        let server = std::thread::spawn(move || {
            monitor.negotiate();
            let (command, _, id) = monitor.command();
            assert_eq!(command, "query-status");
            monitor.say(r#"{"event": "STOP"}"#);
            for _ in 0..1000 {
                monitor.say(&io_error(true));
            }
            monitor.answer(id, json!({"running": false, "status": "paused"}));
            let (command, args, id) = monitor.command();
            assert_eq!(command, "migrate");
            assert_eq!(args, json!({"uri": "fd:pen-migration"}));
            monitor.say(
                &json!({"error": {"class": "GenericError", "desc": "no fd"}, "id": id}).to_string(),
            );
            let (command, args, id) = monitor.command();
            assert_eq!(command, "qom-get");
            assert_eq!(args["property"], "guest-stats");
            monitor.answer(
                id,
                json!({"last-update": 5, "stats": {"stat-free-memory": 1024, "stat-swap-in": -1}}),
            );
            monitor.say(r#"{"event": "RESUME"}"#);
            let (command, _, _) = monitor.command();
            assert_eq!(command, "quit");
            // QEMU closes the monitor as it quits, sometimes before answering.
        });
        let qmp = Qmp::handshake(stream).await.unwrap();
        let mut events = qmp.take_events().expect("the first taker gets the events");
        assert!(qmp.take_events().is_none());
        let status = qmp.query_status().await.unwrap();
        assert_eq!(
            status,
            RunState {
                running: false,
                status: "paused".into()
            }
        );
        let err = qmp.migrate_to_fd("pen-migration").await.unwrap_err();
        assert_eq!(err.to_string(), "QMP migrate failed: no fd");
        let stats = qmp.balloon_stats("/machine/peripheral/b").await.unwrap();
        assert_eq!(stats.get("stat-free-memory"), Some(1024));
        assert_eq!(stats.get("stat-swap-in"), None);
        assert_eq!(stats.get("stat-total-memory"), None);
        qmp.clone().quit().await.unwrap();
        server.join().unwrap();

        let mut seen = Vec::new();
        while let Some(e) = events.recv().await {
            seen.push(e);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], QmpEvent::Stop);
        assert!(matches!(&seen[1], QmpEvent::BlockIoError(e) if e.nospace));
        assert_eq!(seen[2], QmpEvent::Resume);
        // The connection is gone: commands fail at once, they do not wait out a timeout.
        assert!(matches!(qmp.stop().await, Err(QmpError::Closed)));
    }

    /// Two handles issue commands at once; QEMU's answers find their callers by id.
    #[tokio::test]
    async fn clones_share_the_connection() {
        let (mut monitor, stream) = FakeMonitor::pair();
        let server = std::thread::spawn(move || {
            monitor.negotiate();
            let a = monitor.command();
            let b = monitor.command();
            // Answered in reverse order.
            for (command, _, id) in [b, a] {
                monitor.answer(id, json!({"running": true, "status": command}));
            }
            monitor
        });
        let qmp = Qmp::handshake(stream).await.unwrap();
        let other = qmp.clone();
        let (x, y) = tokio::join!(qmp.query_status(), other.execute("query-name", json!({})));
        assert_eq!(x.unwrap().status, "query-status");
        assert_eq!(y.unwrap()["status"], "query-name");
        drop(server.join().unwrap());
    }

    /// `getfd` carries the descriptor as SCM_RIGHTS: the monitor receives a working copy of
    /// it (here, one end of a pipe it then reads from).
    #[tokio::test]
    async fn pass_fd_hands_over_a_working_descriptor() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::io::{IoSliceMut, Read};
        use std::os::fd::{AsFd, FromRawFd};
        let (mut ours, theirs) = StdStream::pair().unwrap();
        let monitor = std::thread::spawn(move || {
            ours.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut buf = [0u8; 256];
            let n = ours.read(&mut buf).unwrap(); // qmp_capabilities
            let v: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(v["execute"], "qmp_capabilities");
            ours.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", v["id"]).as_bytes())
                .unwrap();
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let (bytes, fd) = {
                let msg = recvmsg::<()>(
                    ours.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::empty(),
                )
                .unwrap();
                let fd = msg
                    .cmsgs()
                    .unwrap()
                    .find_map(|c| match c {
                        ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                        _ => None,
                    })
                    .expect("a descriptor came with getfd");
                (msg.bytes, fd)
            };
            let line = String::from_utf8_lossy(&buf[..bytes]).to_string();
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            ours.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", v["id"]).as_bytes())
                .unwrap();
            // SAFETY: the descriptor just received is ours alone.
            let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            (line, text)
        });
        theirs.set_nonblocking(true).unwrap();
        let qmp = Qmp::handshake(UnixStream::from_std(theirs).unwrap())
            .await
            .unwrap();
        let (read, write) = nix::unistd::pipe().unwrap();
        qmp.pass_fd("pen-test", read.as_fd()).await.unwrap();
        drop(read);
        let mut write = std::fs::File::from(write);
        write.write_all(b"through the pipe").unwrap();
        drop(write);
        let (line, text) = monitor.join().unwrap();
        assert!(line.contains("\"execute\":\"getfd\""), "{line}");
        assert!(line.contains("\"fdname\":\"pen-test\""), "{line}");
        assert_eq!(text, "through the pipe");
    }
}
