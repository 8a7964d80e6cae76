//! The agent link's decoder (pen-proto's `FrameCodec` and `Message`), as each end reads it.
//!
//! The first input byte sets how the stream is cut into reads (1 to 256 bytes each), so
//! frames straddle reads as they do on the virtio-serial port; the rest is the stream.
//! Each decoded frame goes through what the reading side does with it in pen-proto (window
//! accounting, exit codes), and must survive a round trip through the encoder.

use std::collections::HashMap;

use bytes::BytesMut;
use pen_proto::{
    Credit, DecodeError, ExitStatus, Frame, FrameCodec, Inbound, Message, SessionId,
    PROTOCOL_VERSION, VOLUME_SLOTS,
};
use tokio_util::codec::{Decoder, Encoder};

/// What the stream handed the reader.
enum Item {
    Frame(Frame),
    Malformed(DecodeError),
    /// An impossible length: the supervisor's `FramedRead` ends the link; the agent drops
    /// what it buffered and reads on (`pen-init/src/link.rs`).
    Desync,
}

fn decode_stream(data: &[u8], mut on_item: impl FnMut(Item) -> bool) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    for piece in stream.chunks(cut as usize + 1) {
        buf.extend_from_slice(piece);
        loop {
            let item = match codec.decode(&mut buf) {
                Ok(Some(Ok(frame))) => Item::Frame(frame),
                Ok(Some(Err(e))) => Item::Malformed(e),
                Ok(None) => break,
                Err(_) => {
                    buf.clear();
                    codec = FrameCodec::new();
                    Item::Desync
                }
            };
            if !on_item(item) {
                return;
            }
        }
    }
}

/// Whatever decoded must encode again and decode to the same frame.
fn round_trip(frame: &Frame) {
    let mut codec = FrameCodec::new();
    let mut wire = BytesMut::new();
    codec
        .encode(frame.clone(), &mut wire)
        .expect("a decoded frame encodes");
    let again = codec
        .decode(&mut wire)
        .expect("re-encoded frame has a valid length")
        .expect("re-encoded frame is whole")
        .expect("re-encoded frame decodes");
    assert_eq!(&again, frame);
    assert!(wire.is_empty());
}

/// The supervisor's side: frames from a (hostile) guest agent.
pub fn from_guest(data: &[u8]) {
    // The relay's mirrors of the guest's credit: output it may send, grants it may make.
    let mut output: HashMap<SessionId, Credit> = HashMap::new();
    let mut input: HashMap<SessionId, Credit> = HashMap::new();
    decode_stream(data, |item| {
        let frame = match item {
            Item::Frame(f) => f,
            Item::Malformed(e) => {
                let _ = e.to_string();
                return true;
            }
            Item::Desync => return false,
        };
        round_trip(&frame);
        let _ = frame.message.kind();
        match &frame.message {
            Message::Hello { version, .. } => {
                let _ = *version == PROTOCOL_VERSION;
            }
            Message::Stdout(d) | Message::Stderr(d) => {
                let credit = output.entry(frame.session).or_default();
                let before = credit.available();
                if credit.spend(d.len()).is_ok() {
                    assert_eq!(credit.available(), before - d.len());
                } else {
                    assert_eq!(credit.available(), before);
                    output.remove(&frame.session);
                }
            }
            Message::Window(n) => {
                // Stdin the guest never received cannot be granted back.
                let credit = input.entry(frame.session).or_default();
                if credit.grant(*n).is_ok() {
                    assert!(credit.available() <= pen_proto::WINDOW as usize);
                } else {
                    input.remove(&frame.session);
                }
            }
            Message::Exit(status) => {
                let code = status.code();
                if let ExitStatus::Signaled(_) = status {
                    assert!((129..=255).contains(&code));
                }
            }
            _ => {}
        }
        true
    });
}

/// The guest agent's side: frames from the host.
pub fn from_host(data: &[u8]) {
    let mut stdin: HashMap<SessionId, Inbound> = HashMap::new();
    let mut output: HashMap<SessionId, Credit> = HashMap::new();
    decode_stream(data, |item| {
        let frame = match item {
            Item::Frame(f) => f,
            Item::Malformed(_) | Item::Desync => return true,
        };
        round_trip(&frame);
        match &frame.message {
            Message::Config(config) => {
                for v in &config.volumes {
                    let _ = (v.slot as usize) < VOLUME_SLOTS && v.path.starts_with('/');
                }
                let _ = config
                    .env
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            }
            Message::Exec(req) => {
                let _ = req.argv.first().map(String::as_str).unwrap_or("bash");
            }
            Message::Stdin(d) => {
                let window = stdin.entry(frame.session).or_default();
                if window.receive(d.len()).is_ok() {
                    let _ = window.consumed(d.len());
                } else {
                    stdin.remove(&frame.session);
                }
            }
            Message::Window(n) => {
                let credit = output.entry(frame.session).or_default();
                if credit.grant(*n).is_err() {
                    output.remove(&frame.session);
                }
            }
            _ => {}
        }
        true
    });
}
