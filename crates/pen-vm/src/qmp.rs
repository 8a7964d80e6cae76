//! A minimal QMP client: JSON commands over QEMU's monitor socket.
//!
//! Hand-rolled rather than typed through the `qapi` crate: its generated types follow a newer
//! QEMU schema than the 7.2 we support (`migrate`, `device_add` and `blockdev-add` changed
//! shape since), while the handful of commands pen sends are easiest to read as plain JSON.
//! Asynchronous events arriving between replies are skipped; pen polls state instead.

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
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .with_context(|| format!("sending QMP {command}"))?;
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
}
