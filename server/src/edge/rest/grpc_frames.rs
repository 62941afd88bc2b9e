//! gRPC length-prefixed message framing, for talking to the in-process gRPC
//! services from the REST transcoder.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub fn encode(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// Accumulates body bytes and yields complete messages.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn next_message(&mut self) -> Result<Option<Bytes>, &'static str> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err("compressed gRPC messages are not expected in-process");
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let mut d = super::Decoder::default();
        let a = super::encode(b"hello");
        let b = super::encode(b"");
        d.push(&a[..3]);
        assert_eq!(d.next_message().unwrap(), None);
        d.push(&a[3..]);
        d.push(&b);
        assert_eq!(&d.next_message().unwrap().unwrap()[..], b"hello");
        assert_eq!(&d.next_message().unwrap().unwrap()[..], b"");
        assert_eq!(d.next_message().unwrap(), None);
    }
}
