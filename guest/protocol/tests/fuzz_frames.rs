//! Property tests of the agent frame decoder against a hostile peer: any
//! bytes in any chunking never panic and never make it hold more than
//! `MAX_BUFFERED`; valid frames embedded in garbage (near-miss magics,
//! magics with impossible lengths, undecodable payloads) all come out, in
//! order, with the garbage counted as skipped.
//!
//! Case counts are sized so each test finishes in seconds in a debug build.

use forkd_agent_protocol::v1::{ExecRequest, PingRequest, Request, request::Body};
use forkd_agent_protocol::{FrameDecoder, HEADER, MAGIC, MAX_BUFFERED, MAX_FRAME, encode_frame};
use proptest::prelude::*;

/// Feeds `bytes` in chunks cycling through `sizes`, draining after every
/// push as the real readers do. Returns (ids, decode errors).
fn feed(dec: &mut FrameDecoder, bytes: &[u8], sizes: &[usize]) -> (Vec<u64>, u64) {
    let (mut ids, mut errors) = (vec![], 0);
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = sizes[i % sizes.len()].min(bytes.len() - at).min(dec.space());
        i += 1;
        let before = dec.buffered();
        dec.push(&bytes[at..at + n]);
        at += n;
        assert!(dec.held() <= MAX_BUFFERED, "holds {} bytes", dec.held());
        assert_eq!(dec.buffered(), before + n);
        loop {
            match dec.next_message::<Request>() {
                Ok(Some(m)) => ids.push(m.id),
                Ok(None) => {
                    // Drained: at most one unfinished frame is left.
                    assert!(dec.buffered() < HEADER + MAX_FRAME);
                    break;
                }
                Err(_) => errors += 1,
            }
        }
    }
    (ids, errors)
}

/// `len` pseudo-random bytes from `seed`: generating them one proptest value
/// per byte dominates a debug build's time. Failures still shrink (shorter,
/// smaller seed) and replay exactly.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    (0..max, any::<u64>()).prop_map(|(len, mut seed)| {
        (0..len)
            .map(|_| {
                // splitmix64
                seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = seed;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    })
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![4 => 1usize..16, 1 => 1usize..4096], 1..8)
}

/// Bytes that are not a frame start: random, with near-miss magics and
/// magics announcing more than `MAX_FRAME` written over them.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    (bytes(40), prop::collection::vec((any::<usize>(), 0u8..5, any::<u32>()), 0..3)).prop_map(|(mut g, marks)| {
        for (at, kind, len) in marks {
            let piece = match kind {
                0 => b"F".to_vec(),
                1 => b"FK".to_vec(),
                2 => b"FKD".to_vec(),
                3 => b"FKD0".to_vec(),
                _ => [MAGIC.as_slice(), &len.max(MAX_FRAME as u32 + 1).to_le_bytes()].concat(),
            };
            if g.len() >= piece.len() {
                let at = at % (g.len() - piece.len() + 1);
                g[at..at + piece.len()].copy_from_slice(&piece);
            }
        }
        defuse(&mut g);
        g
    })
}

/// A magic with a plausible length would be a (fake) frame that rightly
/// swallows what follows; turn those into near misses. `f` cannot complete
/// a new magic, so one pass is enough.
fn defuse(g: &mut [u8]) {
    for i in 0..g.len().saturating_sub(HEADER - 1) {
        if &g[i..i + 4] == MAGIC && u32::from_le_bytes([g[i + 4], g[i + 5], g[i + 6], g[i + 7]]) as usize <= MAX_FRAME {
            g[i] = b'f';
        }
    }
}

fn request(id: u64, arg_len: usize) -> Request {
    let body = if arg_len == 0 {
        Body::Ping(PingRequest {})
    } else {
        Body::Exec(ExecRequest { args: vec!["x".repeat(arg_len)], ..Default::default() })
    };
    Request { id, body: Some(body) }
}

/// A frame with a valid header whose payload does not decode.
fn malformed_frame() -> Vec<u8> {
    [MAGIC.as_slice(), &2u32.to_le_bytes(), &[0x0a, 0x7f]].concat()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 70_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_or_overgrow(
        bytes in bytes(256),
        magics in prop::collection::vec((0usize..256, any::<u32>()), 0..4),
        sizes in chunk_sizes(),
    ) {
        let mut bytes = bytes;
        // Real magics with any length, so the header paths are exercised.
        for (at, len) in magics {
            if at + HEADER <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(MAGIC);
                bytes[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
            }
        }
        let mut dec = FrameDecoder::new();
        let (ids, errors) = feed(&mut dec, &bytes, &sizes);
        prop_assert!(dec.skipped() <= bytes.len() as u64);
        prop_assert_eq!(errors, dec.malformed());
        // Each frame took at least a header's worth of bytes.
        prop_assert!((ids.len() as u64 + errors) * HEADER as u64 <= bytes.len() as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 70_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frames_in_garbage_all_come_out_in_order(
        parts in prop::collection::vec((garbage(), any::<u64>(), 0usize..300, prop::bool::weighted(0.1)), 0..6),
        tail in garbage(),
        sizes in chunk_sizes(),
    ) {
        let mut stream = vec![];
        let (mut want, mut junk, mut bad) = (vec![], 0u64, 0u64);
        for (g, id, arg_len, malformed) in parts {
            junk += g.len() as u64;
            stream.extend(g);
            if malformed {
                stream.extend(malformed_frame());
                bad += 1;
            } else {
                stream.extend(encode_frame(&request(id, arg_len)));
                want.push(id);
            }
        }
        // Trailing garbage ends the stream: only bytes that cannot start a
        // frame are certain to be skipped by now.
        let tail_skipped = tail.len().saturating_sub(HEADER - 1) as u64;
        stream.extend(tail);
        let mut dec = FrameDecoder::new();
        let (ids, errors) = feed(&mut dec, &stream, &sizes);
        prop_assert_eq!(ids, want);
        prop_assert_eq!(errors, bad);
        prop_assert_eq!(dec.malformed(), bad);
        prop_assert!(dec.skipped() >= junk + tail_skipped && dec.skipped() <= junk + tail_skipped + HEADER as u64);
    }
}
