//! The host <-> guest agent channel: protobuf messages (`forkd.agent.v1`) and
//! the frame format that carries them over a raw byte stream.
//!
//! A frame is `b"FKD1"`, a little-endian `u32` payload length, then the
//! payload. The magic lets a reader skip garbage — for example the tail of a
//! frame that was in flight when a VM was snapshotted — and find the next
//! frame boundary.
//!
//! Either end of the channel may be hostile (the guest is untrusted code), so
//! the decoder does work linear in the bytes it is given and holds a bounded
//! amount of them; see [`FrameDecoder`].

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
/// Magic plus length.
pub const HEADER: usize = 8;
/// A drained decoder (one whose `next_message` last returned `Ok(None)`)
/// always has room for a chunk of at least this size.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Least credit one data message on a port stream costs (see PortOpenRequest).
pub const PORT_MIN_CHARGE: u32 = 1024;
/// Largest data in one port stream message.
pub const PORT_MAX_DATA: usize = 64 * 1024;

/// Credit a port stream's data message costs.
pub fn port_charge(len: usize) -> u32 {
    (len.min(u32::MAX as usize) as u32).max(PORT_MIN_CHARGE)
}
/// Most bytes a decoder ever holds (and allocates): the largest frame still
/// waiting for its end, plus one chunk pushed after it.
pub const MAX_BUFFERED: usize = HEADER + MAX_FRAME + MAX_CHUNK;

/// A consumed prefix shorter than this is not worth moving the tail for.
const COMPACT_MIN: usize = 4096;
/// An emptied buffer keeps at most this much of its allocation, so one huge
/// frame does not pin 9 MiB per connection for ever.
const RETAIN: usize = 256 * 1024;

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
///
/// Bounds, whatever the bytes:
/// - after a drain it buffers less than `HEADER + MAX_FRAME` bytes (at most
///   one unfinished frame), so right after a push of `n` bytes it buffers
///   less than `HEADER + MAX_FRAME + n`;
/// - it holds (and has allocated) at most [`MAX_BUFFERED`] bytes; `push`
///   takes at most [`space`](Self::space) bytes, which after a drain (a
///   `next_message` that returned `Ok(None)`) is more than [`MAX_CHUNK`] —
///   so a caller reading into a buffer of at most `space()` bytes, or of at
///   most `MAX_CHUNK` bytes and draining after every push, never trips it;
/// - every byte is scanned for the magic a constant number of times and
///   moved at most a constant number of times on average: consumed bytes
///   are skipped with a cursor, and the tail is copied to the front only
///   when the consumed prefix outweighs it (or to make room for a push).
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// `buf[..pos]` is consumed; `buf[pos..]` has not been looked at past
    /// the frame (or partial magic) that starts at `pos`.
    pos: usize,
    skipped: u64,
    malformed: u64,
    oversize: u64,
    /// Bytes copied to the front by compaction (a measure of work done).
    moved: u64,
    compactions: u64,
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

    /// How many bytes `push` accepts now.
    pub fn space(&self) -> usize {
        MAX_BUFFERED - self.buffered()
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes held in memory (allocated), never more than [`MAX_BUFFERED`].
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// Appends newly received bytes.
    ///
    /// # Panics
    /// If `bytes` is longer than [`space`](Self::space): the bound on what a
    /// decoder holds is kept by refusing, not by dropping bytes silently.
    pub fn push(&mut self, bytes: &[u8]) {
        assert!(
            bytes.len() <= self.space(),
            "FrameDecoder::push of {} bytes with room for {}",
            bytes.len(),
            self.space()
        );
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > RETAIN {
                self.buf.shrink_to(RETAIN);
            }
        } else if self.pos > 0
            && ((self.pos >= COMPACT_MIN && self.pos > self.buf.len() - self.pos)
                || self.buf.len() + bytes.len() > MAX_BUFFERED)
        {
            self.compact();
        }
        let need = self.buf.len() + bytes.len();
        if need > self.buf.capacity() {
            // Grow geometrically, but never past the bound.
            let target = need.max(self.buf.capacity().saturating_mul(2)).min(MAX_BUFFERED);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Moves the unconsumed tail to the front.
    fn compact(&mut self) {
        let tail = self.buf.len() - self.pos;
        self.buf.copy_within(self.pos.., 0);
        self.buf.truncate(tail);
        self.pos = 0;
        self.moved += tail as u64;
        self.compactions += 1;
    }

    /// Bytes discarded so far while looking for a frame start.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Frames whose header was valid but whose payload did not decode.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Headers whose length exceeded [`MAX_FRAME`] (each one skipped).
    pub fn oversize(&self) -> u64 {
        self.oversize
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed.
    /// A frame whose payload does not decode is dropped and reported once.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, DecodeError> {
        loop {
            let rest = &self.buf[self.pos..];
            match find_magic(rest) {
                Some(at) => {
                    self.skipped += at as u64;
                    self.pos += at;
                }
                None => {
                    // Keep a possible partial magic at the end; the next
                    // scan starts there, so nothing else is looked at twice.
                    let drop = rest.len().saturating_sub(MAGIC.len() - 1);
                    self.skipped += drop as u64;
                    self.pos += drop;
                    return Ok(None);
                }
            }
            let rest = &self.buf[self.pos..];
            let Some(len) = rest.get(4..HEADER).map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize) else {
                return Ok(None);
            };
            if len > MAX_FRAME {
                // Not a real header: skip this magic and resynchronise.
                self.oversize += 1;
                self.skipped += 1;
                self.pos += 1;
                continue;
            }
            let Some(payload) = rest.get(HEADER..HEADER + len) else {
                return Ok(None);
            };
            let result = M::decode(payload);
            self.pos += HEADER + len;
            return match result {
                Ok(m) => Ok(Some(m)),
                Err(e) => {
                    self.malformed += 1;
                    Err(DecodeError(e))
                }
            };
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

    fn drain(dec: &mut FrameDecoder, got: &mut Vec<u64>) {
        loop {
            match dec.next_message::<Request>() {
                Ok(Some(m)) => got.push(m.id),
                Ok(None) => return,
                Err(_) => {}
            }
        }
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
        assert_eq!(dec.oversize(), 1);
        assert_eq!(dec.skipped(), 8);
    }

    #[test]
    fn counts_malformed_payloads_and_carries_on() {
        // Field 1 as a length-delimited value whose length runs past the end.
        let bad = [MAGIC.as_slice(), &2u32.to_le_bytes(), &[0x0a, 0x7f]].concat();
        let mut dec = FrameDecoder::new();
        dec.push(&[bad, encode_frame(&ping(3))].concat());
        assert!(dec.next_message::<Request>().is_err());
        assert_eq!(dec.next_message::<Request>().unwrap().unwrap().id, 3);
        assert_eq!((dec.malformed(), dec.oversize(), dec.skipped()), (1, 0, 0));
    }

    #[test]
    fn a_drained_decoder_takes_a_full_chunk() {
        let mut dec = FrameDecoder::new();
        // A header announcing the largest frame, then all but one byte of it.
        dec.push(&[MAGIC.as_slice(), &(MAX_FRAME as u32).to_le_bytes()].concat());
        let filler = vec![0u8; MAX_CHUNK];
        let mut sent = 0;
        while sent < MAX_FRAME - 1 {
            let n = filler.len().min(MAX_FRAME - 1 - sent);
            dec.push(&filler[..n]);
            sent += n;
            assert!(dec.next_message::<Request>().unwrap().is_none());
        }
        assert!(dec.space() > MAX_CHUNK);
        dec.push(&filler);
        assert!(dec.held() <= MAX_BUFFERED);
    }

    #[test]
    #[should_panic(expected = "room for")]
    fn push_past_the_bound_is_refused() {
        let mut dec = FrameDecoder::new();
        dec.push(&vec![0u8; MAX_BUFFERED + 1]);
    }

    /// Work stays linear: 10,000 frames fed one byte at a time, then 1 MiB of
    /// garbage the same way, then all of it again in 64 KiB reads. Counted
    /// in bytes moved by compaction, not in time, so it cannot flake.
    #[test]
    fn decoding_work_is_linear() {
        let mut stream = Vec::new();
        for i in 0..10_000 {
            stream.extend(encode_frame(&ping(i)));
        }
        let mut garbage: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        // Near-misses of the magic, and real magics with impossible lengths.
        for at in (0..garbage.len() - HEADER).step_by(1000) {
            garbage[at..at + 4].copy_from_slice(b"FKD0");
        }
        for at in (500..garbage.len() - HEADER).step_by(5000) {
            garbage[at..at + 4].copy_from_slice(MAGIC);
            garbage[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        stream.extend(&garbage);
        stream.extend(encode_frame(&ping(10_000)));
        let total = stream.len() as u64;
        for chunk in [1, 7, 64 * 1024] {
            let mut dec = FrameDecoder::new();
            let mut got = vec![];
            for c in stream.chunks(chunk) {
                dec.push(c);
                drain(&mut dec, &mut got);
                assert!(dec.held() <= MAX_BUFFERED);
            }
            assert_eq!(got, (0..=10_000).collect::<Vec<_>>(), "chunk {chunk}");
            assert_eq!(dec.skipped(), garbage.len() as u64);
            eprintln!("{chunk}-byte chunks: {total} bytes in, {} moved in {} compactions", dec.moved, dec.compactions);
            assert!(dec.moved <= total, "chunk {chunk}: moved {} of {total} bytes", dec.moved);
            assert!(
                dec.compactions <= total / COMPACT_MIN as u64 + 1,
                "chunk {chunk}: {} compactions",
                dec.compactions
            );
        }
    }
}
