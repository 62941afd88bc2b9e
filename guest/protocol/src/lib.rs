//! The host <-> guest agent channel: protobuf messages (`forkd.agent.v1`) and
//! the frame format that carries them over a raw byte stream.
//!
//! A frame is `b"FKD1"`, a little-endian `u32` payload length, then the
//! payload. The magic lets a reader skip garbage — for example the tail of a
//! frame that was in flight when a VM was snapshotted — and find the next
//! frame boundary.

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/forkd.agent.v1.rs"));
}

use prost::Message;

/// Start of every frame.
pub const MAGIC: &[u8; 4] = b"FKD1";
/// Upper bound of one payload; larger frames are treated as corruption.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// The virtio-serial port name the agent listens on.
pub const PORT_NAME: &str = "forkd.agent";
const HEADER: usize = 8;

/// Encodes `msg` as one frame.
pub fn encode_frame<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(HEADER + len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(&mut out).expect("Vec grows as needed");
    out
}

/// Incremental frame decoder: feed it bytes as they arrive, take messages out.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    skipped: u64,
}

/// What went wrong while decoding a frame whose header was valid.
#[derive(Debug)]
pub struct DecodeError(pub prost::DecodeError);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad agent frame payload: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends newly received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes discarded so far while looking for a frame start.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed.
    /// A frame whose payload does not decode is dropped and reported once.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, DecodeError> {
        loop {
            match find_magic(&self.buf) {
                Some(0) => {}
                Some(at) => {
                    self.skipped += at as u64;
                    self.buf.drain(..at);
                }
                None => {
                    // Keep a possible partial magic at the end.
                    let keep = self.buf.len().min(MAGIC.len() - 1);
                    let drop = self.buf.len() - keep;
                    self.skipped += drop as u64;
                    self.buf.drain(..drop);
                    return Ok(None);
                }
            }
            if self.buf.len() < HEADER {
                return Ok(None);
            }
            let len = u32::from_le_bytes(self.buf[4..8].try_into().unwrap()) as usize;
            if len > MAX_FRAME {
                // Not a real header: skip this magic and resynchronise.
                self.skipped += 1;
                self.buf.drain(..1);
                continue;
            }
            if self.buf.len() < HEADER + len {
                return Ok(None);
            }
            let result = M::decode(&self.buf[HEADER..HEADER + len]);
            self.buf.drain(..HEADER + len);
            return result.map(Some).map_err(DecodeError);
        }
    }
}

fn find_magic(buf: &[u8]) -> Option<usize> {
    buf.windows(MAGIC.len()).position(|w| w == MAGIC)
}

#[cfg(test)]
mod tests {
    use super::v1::{PingRequest, Request, request::Body};
    use super::*;

    fn ping(id: u64) -> Request {
        Request { id, body: Some(Body::Ping(PingRequest {})) }
    }

    #[test]
    fn round_trips_split_frames() {
        let bytes = [encode_frame(&ping(1)), encode_frame(&ping(2))].concat();
        let mut dec = FrameDecoder::new();
        let mut got = vec![];
        for b in bytes.chunks(3) {
            dec.push(b);
            while let Some(m) = dec.next_message::<Request>().unwrap() {
                got.push(m.id);
            }
        }
        assert_eq!(got, vec![1, 2]);
        assert_eq!(dec.skipped(), 0);
    }

    #[test]
    fn resynchronises_after_garbage() {
        let mut bytes = b"xxFKD".to_vec();
        bytes.extend(encode_frame(&ping(7)));
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(dec.next_message::<Request>().unwrap().unwrap().id, 7);
        assert_eq!(dec.skipped(), 5);
    }

    #[test]
    fn rejects_oversize_length_without_stalling() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend(u32::MAX.to_le_bytes());
        bytes.extend(encode_frame(&ping(9)));
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(dec.next_message::<Request>().unwrap().unwrap().id, 9);
    }
}
