//! A minimal QMP client: JSON commands over QEMU's monitor socket.
//!
//! Hand-rolled rather than typed through the `qapi` crate: its generated types follow a newer
//! QEMU schema than the 7.2 we support (`migrate`, `device_add` and `blockdev-add` changed
//! shape since), while the handful of commands pen sends are easiest to read as plain JSON.
//! Asynchronous events arriving between replies are skipped; pen polls state instead.
//!
//! Sockets and files QEMU needs after it started (a migration stream, the virtiofsd socket
//! of a hot-plugged workspace, a cold boot's volume files) are handed to it as file
//! descriptors ([`Qmp::pass_fd`], QMP `getfd`; [`Qmp::add_fd`], QMP `add-fd`) rather than as
//! paths: pen's runtime directory is private, and a QEMU that has
//! dropped root (see `qemu::runas`) could not open them.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long one command may take to be answered. Commands pen sends return at once
/// (migrations run in the background and are polled), so this only catches a wedged QEMU.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to the monitor socket and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to QMP at {}", path.display()))?;
        Qmp::handshake(stream).await
    }

    /// Takes over a fresh connection to the monitor socket.
    pub async fn handshake(stream: UnixStream) -> anyhow::Result<Qmp> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        // The greeting: {"QMP": {...}}.
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            anyhow::bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (a JSON object) and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let line = command_line(command, arguments)?;
        self.writer
            .write_all(&line)
            .await
            .with_context(|| format!("sending QMP {command}"))?;
        self.reply(command).await
    }

    /// Hands QEMU a duplicate of `fd` under `name` (QMP `getfd`, the descriptor travelling
    /// as `SCM_RIGHTS` with the command). A command that then names it (`fd:NAME` migration
    /// URIs, a socket address of type `fd`) takes it over.
    pub async fn pass_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> anyhow::Result<()> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd)
            .await
            .map(drop)
    }

    /// Adds a duplicate of `fd` to QEMU's fd set `fdset` (QMP `add-fd`): a block node then
    /// opens it as `/dev/fdset/FDSET`, with the access mode `fd` was opened with.
    pub async fn add_fd(&mut self, fdset: u32, fd: BorrowedFd<'_>) -> anyhow::Result<()> {
        self.execute_with_fd("add-fd", json!({ "fdset-id": fdset }), fd)
            .await
            .map(drop)
    }

    /// [`Qmp::execute`] with `fd` attached to the command as `SCM_RIGHTS`.
    async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> anyhow::Result<Value> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let line = command_line(command, arguments)?;
        let socket = self.writer.as_ref();
        let sent = loop {
            socket
                .writable()
                .await
                .with_context(|| format!("sending QMP {command}"))?;
            let fds = [fd.as_raw_fd()];
            match socket.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &[IoSlice::new(&line)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).with_context(|| format!("sending QMP {command}")),
            }
        };
        // The descriptor went with the first byte; the rest of a short write is plain data.
        self.writer
            .write_all(&line[sent..])
            .await
            .with_context(|| format!("sending QMP {command}"))?;
        self.reply(command).await
    }

    async fn reply(&mut self, command: &str) -> anyhow::Result<Value> {
        let reply = tokio::time::timeout(REPLY_TIMEOUT, async {
            loop {
                let message = self.read_message().await?;
                if message.get("event").is_none() {
                    return anyhow::Ok(message);
                }
            }
        })
        .await
        .with_context(|| format!("QMP {command} got no answer within {REPLY_TIMEOUT:?}"))??;
        parse_reply(command, reply)
    }

    async fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            anyhow::bail!("QEMU closed the QMP connection");
        }
        serde_json::from_str(&line).with_context(|| format!("malformed QMP message: {line:?}"))
    }
}

fn command_line(command: &str, arguments: Value) -> anyhow::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))?;
    line.push(b'\n');
    Ok(line)
}

/// The `return` of a reply, or its `error` as an error naming the command.
fn parse_reply(command: &str, reply: Value) -> anyhow::Result<Value> {
    if let Some(ret) = reply.get("return") {
        return Ok(ret.clone());
    }
    if let Some(err) = reply.get("error") {
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("no description");
        anyhow::bail!("QMP {command} failed: {desc}");
    }
    anyhow::bail!("unexpected QMP reply to {command}: {reply}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_errors() {
        assert_eq!(
            parse_reply("x", json!({"return": {"status": "completed"}})).unwrap(),
            json!({"status": "completed"})
        );
        let err = parse_reply(
            "device_add",
            json!({"error": {"class": "GenericError", "desc": "Bus 'rp9' not found"}}),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "QMP device_add failed: Bus 'rp9' not found");
        assert!(parse_reply("x", json!({"what": 1})).is_err());
    }

    #[tokio::test]
    async fn talks_to_a_fake_monitor() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let mut seen = String::new();
            for reply in [
                "{\"return\": {}}\n",
                // An event before the reply is skipped.
                "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}\n",
            ] {
                let n = s.read(&mut buf).await.unwrap();
                seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
                s.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let status = qmp.execute("query-status", json!({})).await.unwrap();
        assert_eq!(status["status"], "paused");
        let seen = server.await.unwrap();
        assert!(seen.contains("\"execute\":\"qmp_capabilities\""), "{seen}");
        assert!(seen.contains("\"execute\":\"query-status\""), "{seen}");
    }

    /// `getfd` carries the descriptor as SCM_RIGHTS: the monitor receives a working copy of
    /// it (here, one end of a pipe it then reads from).
    #[tokio::test]
    async fn pass_fd_hands_over_a_working_descriptor() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::io::{IoSliceMut, Read, Write};
        use std::os::fd::{AsFd, AsRawFd, FromRawFd};
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let monitor = std::thread::spawn(move || {
            ours.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut buf = [0u8; 256];
            let n = ours.read(&mut buf).unwrap(); // qmp_capabilities
            assert!(std::str::from_utf8(&buf[..n])
                .unwrap()
                .contains("qmp_capabilities"));
            ours.write_all(b"{\"return\": {}}\n").unwrap();
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
            ours.write_all(b"{\"return\": {}}\n").unwrap();
            // SAFETY: the descriptor just received is ours alone.
            let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            (line, text)
        });
        theirs.set_nonblocking(true).unwrap();
        let mut qmp = Qmp::handshake(UnixStream::from_std(theirs).unwrap())
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
