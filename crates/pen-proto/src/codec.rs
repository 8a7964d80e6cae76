use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::{Frame, Message, SessionId};

/// Largest frame accepted or produced (session id + payload). Stdout chunks are far smaller;
/// the bound only stops a corrupt length from making the reader allocate gigabytes.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// A frame that arrived whole but could not be understood. The stream stays usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame too short to hold a session id ({0} bytes)")]
    TooShort(usize),
    #[error("malformed message on session {session}: {reason}")]
    Malformed { session: SessionId, reason: String },
}

/// Encodes [`Frame`]s and decodes them as `Result<Frame, DecodeError>`: a malformed payload
/// is reported as an item, not as a stream error, so one bad frame never tears down the
/// link. Only I/O errors and impossible lengths (> [`MAX_FRAME_LEN`]) end the stream.
#[derive(Debug)]
pub struct FrameCodec {
    framing: LengthDelimitedCodec,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            framing: LengthDelimitedCodec::builder()
                .length_field_type::<u32>()
                .max_frame_length(MAX_FRAME_LEN)
                .new_codec(),
        }
    }
}

impl FrameCodec {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Decoder for FrameCodec {
    type Item = Result<Frame, DecodeError>;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let Some(mut body) = self.framing.decode(src)? else {
            return Ok(None);
        };
        #[cfg(feature = "capture")]
        crate::capture::record(true, &body);
        if body.len() < 4 {
            return Ok(Some(Err(DecodeError::TooShort(body.len()))));
        }
        let session = body.get_u32();
        Ok(Some(match postcard::from_bytes::<Message>(&body) {
            Ok(message) => Ok(Frame { session, message }),
            Err(e) => Err(DecodeError::Malformed {
                session,
                reason: e.to_string(),
            }),
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let mut body = BytesMut::new();
        body.put_u32(frame.session);
        let payload = postcard::to_stdvec(&frame.message)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        body.extend_from_slice(&payload);
        #[cfg(feature = "capture")]
        crate::capture::record(false, &body);
        self.framing.encode(body.freeze(), dst)
    }
}

/// One frame as it goes on the wire, for writers outside tokio (tools, tests that play a
/// client).
pub fn encode_frame(frame: Frame) -> std::io::Result<Vec<u8>> {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame, &mut buf)?;
    Ok(buf.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExecRequest, ExitStatus, TtyRequest, WindowSize};

    fn roundtrip(frame: Frame) -> Frame {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        codec.encode(frame, &mut buf).unwrap();
        codec.decode(&mut buf).unwrap().unwrap().unwrap()
    }

    #[test]
    fn frames_roundtrip() {
        let frames = vec![
            Frame::control(Message::Hello {
                version: 1,
                software: "pen 0.1".into(),
            }),
            Frame::new(
                7,
                Message::Exec(ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
                    env: vec![("K".into(), "V".into())],
                    cwd: Some("/workspace".into()),
                    tty: Some(TtyRequest {
                        term: "xterm-256color".into(),
                        size: WindowSize { rows: 24, cols: 80 },
                    }),
                }),
            ),
            Frame::new(7, Message::Stdout((0..=255u8).collect())),
            Frame::new(7, Message::Exit(ExitStatus::Signaled(15))),
        ];
        for frame in frames {
            assert_eq!(roundtrip(frame.clone()), frame);
        }
    }

    #[test]
    fn malformed_payload_names_its_session_and_keeps_the_stream() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        // length 6: session 5 + two garbage bytes (an enum tag far out of range).
        buf.put_u32(6);
        buf.put_u32(5);
        buf.put_slice(&[0xff, 0xff]);
        codec
            .encode(Frame::new(5, Message::Signal(2)), &mut buf)
            .unwrap();
        match codec.decode(&mut buf).unwrap().unwrap() {
            Err(DecodeError::Malformed { session, .. }) => assert_eq!(session, 5),
            other => panic!("expected a malformed frame, got {other:?}"),
        }
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().unwrap(),
            Frame::new(5, Message::Signal(2))
        );
    }

    #[test]
    fn oversized_length_is_a_stream_error() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(codec.decode(&mut buf).is_err());
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut codec = FrameCodec::new();
        let mut full = BytesMut::new();
        codec
            .encode(Frame::new(1, Message::Stdin(vec![1, 2, 3])), &mut full)
            .unwrap();
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&full[full.len() - 1..]);
        assert!(codec.decode(&mut buf).unwrap().is_some());
    }

    /// Fuzzing the decoder from the hostile side: whatever bytes arrive, in whatever pieces,
    /// decoding never panics, never yields a frame from nothing, and a stream error (an
    /// impossible length) is final. Frames that were sent whole come out whole and in order,
    /// even with garbage payloads between them.
    mod fuzz {
        use super::*;
        use crate::testing;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Feeds `bytes` to a fresh decoder in pieces cut at `cuts`, returning every item
        /// and whether the stream ended in an error.
        fn decode_in_pieces(
            bytes: &[u8],
            cuts: &[usize],
        ) -> (Vec<Result<Frame, DecodeError>>, bool) {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            let mut items = Vec::new();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.push(bytes.len());
            points.sort_unstable();
            let mut start = 0;
            for end in points {
                buf.extend_from_slice(&bytes[start..end]);
                start = end;
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(item)) => items.push(item),
                        Ok(None) => break,
                        Err(_) => return (items, true),
                    }
                }
            }
            (items, false)
        }

        fn encode_all(frames: &[Frame]) -> Vec<u8> {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            for frame in frames {
                codec.encode(frame.clone(), &mut buf).unwrap();
            }
            buf.to_vec()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn random_bytes_never_panic_and_every_item_has_a_whole_frame_behind_it(
                bytes in vec(any::<u8>(), 0..4096),
                cuts in vec(any::<usize>(), 0..8),
            ) {
                let (items, _) = decode_in_pieces(&bytes, &cuts);
                // Each item consumed at least a 4-byte length prefix.
                prop_assert!(items.len() * 4 <= bytes.len());
            }

            #[test]
            fn frames_survive_any_split_of_the_stream(
                frames in vec(testing::frame(), 0..12),
                cuts in vec(any::<usize>(), 0..16),
            ) {
                let bytes = encode_all(&frames);
                let (items, failed) = decode_in_pieces(&bytes, &cuts);
                prop_assert!(!failed);
                let decoded: Vec<Frame> = items.into_iter().map(|i| i.unwrap()).collect();
                prop_assert_eq!(decoded, frames);
            }

            #[test]
            fn a_corrupt_payload_costs_only_its_own_frame(
                before in testing::frame(),
                garbage_session in any::<u32>(),
                garbage in vec(any::<u8>(), 0..256),
                after in testing::frame(),
            ) {
                let mut bytes = encode_all(std::slice::from_ref(&before));
                bytes.extend_from_slice(&(4 + garbage.len() as u32).to_be_bytes());
                bytes.extend_from_slice(&garbage_session.to_be_bytes());
                bytes.extend_from_slice(&garbage);
                bytes.extend_from_slice(&encode_all(std::slice::from_ref(&after)));
                let (items, failed) = decode_in_pieces(&bytes, &[]);
                prop_assert!(!failed);
                prop_assert_eq!(items.len(), 3);
                prop_assert_eq!(items[0].as_ref().unwrap(), &before);
                match &items[1] {
                    // Garbage may happen to be a valid message; then it names its session.
                    Ok(frame) => prop_assert_eq!(frame.session, garbage_session),
                    Err(DecodeError::Malformed { session, .. }) => {
                        prop_assert_eq!(*session, garbage_session)
                    }
                    Err(e) => prop_assert!(false, "unexpected {e:?}"),
                }
                prop_assert_eq!(items[2].as_ref().unwrap(), &after);
            }

            #[test]
            fn lengths_beyond_the_limit_end_the_stream_without_allocating_them(
                len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
                tail in vec(any::<u8>(), 0..64),
            ) {
                let mut bytes = len.to_be_bytes().to_vec();
                bytes.extend_from_slice(&tail);
                let (items, failed) = decode_in_pieces(&bytes, &[]);
                prop_assert!(items.is_empty());
                prop_assert!(failed);
            }
        }
    }
}
