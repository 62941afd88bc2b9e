//! Host side of port streams: a TCP connection to a port on the guest's
//! loopback, carried over the agent channel and handed to the daemon as an
//! ordinary byte stream (a `DuplexStream`), so the HTTP proxy, gRPC
//! `OpenPort` and anything else can use it like a socket.
//!
//! Both directions run on credit (see `PortOpenRequest` in agent.proto):
//! the guest may send at most [`HOST_WINDOW`] bytes (each message charged
//! at least `PORT_MIN_CHARGE`) before the daemon grants more, and it grants
//! only what its consumer has taken. A consumer that does not read stalls
//! its own stream; a guest that does not read stalls the daemon's sends on
//! that stream only; a guest that sends past its credit loses the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forkd_agent_protocol::v1::{self as pb, request, response};
use forkd_agent_protocol::{PORT_MAX_DATA, PORT_MIN_CHARGE, encode_frame, port_charge};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;

use super::{AgentClient, AgentError, CancelOnDrop, Delivery, Failure, Responses, Waiters, guest_text, write_frame};

/// Credit the guest starts with (and most it may have outstanding).
pub const HOST_WINDOW: u32 = 256 * 1024;
/// Bytes buffered between the pump and the consumer, each way.
const DUPLEX_BUFFER: usize = 64 * 1024;
/// Messages queued per stream: data costs at least `PORT_MIN_CHARGE`, so a
/// guest within its credit never fills this.
const QUEUE: usize = (HOST_WINDOW / PORT_MIN_CHARGE) as usize + 8;
/// Grants are batched up to this much (or until the queue is empty).
const GRANT_BATCH: u32 = 64 * 1024;

/// Takes a port event's credit grant out (adding it to `credit`); answers
/// what is left to queue, if anything.
pub(super) fn take_grant(body: response::Body, credit: &Semaphore) -> Option<response::Body> {
    match body {
        response::Body::PortEvent(mut e) if e.grant > 0 => {
            // Never more permits than a window: a guest that grants itself
            // more only overruns its own inbox.
            let room = (HOST_WINDOW as usize * 2).saturating_sub(credit.available_permits());
            credit.add_permits((e.grant as usize).min(room));
            e.grant = 0;
            let rest = e.opened || e.eof || e.closed || !e.data.is_empty() || !e.error.is_empty();
            rest.then_some(response::Body::PortEvent(e))
        }
        other => Some(other),
    }
}

/// Writes one-way frames (PortSend) for one stream.
#[derive(Clone)]
struct Outbox {
    target: u64,
    writer: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>,
    failure: Failure,
    waiters: Waiters,
}

impl Outbox {
    async fn send(&self, req: pb::PortSendRequest) -> Result<(), AgentError> {
        // Nobody waits for an answer: the id only has to be unlike a live one.
        let frame = encode_frame(&pb::Request { id: 0, body: Some(request::Body::PortSend(req)) });
        write_frame(&self.writer, &frame, &self.failure, &self.waiters).await
    }

    async fn grant(&self, grant: u32) -> Result<(), AgentError> {
        self.send(pb::PortSendRequest { target_id: self.target, grant, ..Default::default() }).await
    }
}

impl AgentClient {
    /// Connects to `port` on the guest's loopback. Fails with a guest
    /// NOT_FOUND error when nothing listens there.
    pub async fn open_port(&self, port: u16, timeout: Duration) -> Result<DuplexStream, AgentError> {
        let credit = Arc::new(Semaphore::new(0));
        let lagged = Arc::new(AtomicBool::new(false));
        let delivery = Delivery { lagged: Some(lagged.clone()), credit: Some(credit.clone()), queue: QUEUE };
        let open = pb::PortOpenRequest { port: port as u32, window: HOST_WINDOW };
        let (id, mut rx) = tokio::time::timeout(timeout, self.send_to(request::Body::PortOpen(open), delivery))
            .await
            .map_err(|_| AgentError::Timeout("port open".into()))??;
        let mut cancel = self.cancel_on_drop(id);
        match tokio::time::timeout(timeout, rx.recv()).await {
            Err(_) => return Err(AgentError::Timeout(format!("connecting to port {port}"))),
            Ok(None) => {
                cancel.done = true;
                return Err(self.closed());
            }
            Ok(Some(response::Body::Error(e))) => {
                cancel.done = true;
                return Err(AgentError::Guest { kind: e.kind, message: guest_text(&e.message) });
            }
            Ok(Some(response::Body::PortEvent(e))) if e.opened => {}
            Ok(Some(_)) => return Err(AgentError::Unexpected("port open")),
        }
        let outbox = Outbox {
            target: id,
            writer: self.writer.clone(),
            failure: self.failure.clone(),
            waiters: self.waiters.clone(),
        };
        let (ours, theirs) = tokio::io::duplex(DUPLEX_BUFFER);
        tokio::spawn(pump(ours, rx, cancel, lagged, credit, outbox));
        Ok(theirs)
    }
}

/// Moves bytes both ways until the stream closes, the consumer goes away,
/// or the guest breaks the rules.
async fn pump(
    io: DuplexStream,
    mut rx: Responses,
    mut cancel: CancelOnDrop,
    lagged: Arc<AtomicBool>,
    credit: Arc<Semaphore>,
    outbox: Outbox,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = outbox.clone();
    // Consumer → guest, within the guest's credit.
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; PORT_MAX_DATA];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            if n == 0 {
                let _ = up.send(pb::PortSendRequest { target_id: up.target, eof: true, ..Default::default() }).await;
                return;
            }
            // Send what the credit allows as soon as there is any: waiting
            // for all of it could wait for a grant that needs this data.
            let mut off = 0;
            while off < n {
                let Ok(first) = credit.acquire().await else { return };
                first.forget();
                // This task is the only one taking permits: they are there.
                let extra = credit.available_permits().min(n - off - 1);
                if extra > 0
                    && let Ok(p) = credit.try_acquire_many(extra as u32)
                {
                    p.forget();
                }
                let take = 1 + extra;
                let data = buf[off..off + take].to_vec();
                off += take;
                if up.send(pb::PortSendRequest { target_id: up.target, data, ..Default::default() }).await.is_err() {
                    return;
                }
            }
        }
    });
    // Guest → consumer. `credit` is what the guest may still send: the
    // window plus every grant sent, less every charge received.
    let mut credit: u64 = HOST_WINDOW as u64;
    let mut to_grant: u32 = 0;
    let why = loop {
        let Some(body) = rx.recv().await else {
            cancel.done = outbox.failure.get().is_some();
            break if lagged.load(Ordering::SeqCst) {
                Some("the guest sent past its credit".to_string())
            } else {
                Some("the channel to the guest closed".to_string())
            };
        };
        let e = match body {
            response::Body::PortEvent(e) => e,
            response::Body::Error(e) => {
                cancel.done = true;
                break Some(guest_text(&e.message));
            }
            _ => break Some("unexpected message on a port stream".into()),
        };
        if !e.data.is_empty() {
            let charge = port_charge(e.data.len());
            if charge as u64 > credit {
                break Some("the guest sent past its credit".into());
            }
            credit -= charge as u64;
            if wr.write_all(&e.data).await.is_err() {
                break None; // the consumer went away
            }
            to_grant += charge;
            if to_grant >= GRANT_BATCH || rx.rx.is_empty() {
                if outbox.grant(to_grant).await.is_err() {
                    break Some("the channel to the guest broke".into());
                }
                credit += to_grant as u64;
                to_grant = 0;
            }
        }
        if e.eof {
            let _ = wr.shutdown().await;
        }
        if e.closed {
            cancel.done = true;
            break (!e.error.is_empty()).then(|| guest_text(&e.error));
        }
    };
    if let Some(why) = why {
        tracing::debug!(target = outbox.target, "port stream ended: {why}");
    }
    upstream.abort();
    // Dropping `cancel` tells the guest to close a stream that is still open.
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_agent_protocol::FrameDecoder;
    use tokio::net::UnixStream;

    use crate::agent::test_pair as pair;

    async fn next_request(guest: &mut UnixStream, dec: &mut FrameDecoder) -> pb::Request {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(r) = dec.next_message::<pb::Request>().unwrap() {
                return r;
            }
            let n = guest.read(&mut buf).await.unwrap();
            assert!(n > 0, "the host closed the channel");
            dec.push(&buf[..n]);
        }
    }

    async fn send_event(guest: &mut UnixStream, id: u64, e: pb::PortEvent) {
        let frame = encode_frame(&pb::Response { id, body: Some(response::Body::PortEvent(e)) });
        guest.write_all(&frame).await.unwrap();
    }

    /// Opens a port against the fake guest; answers the stream's id.
    async fn open(client: &AgentClient, guest: &mut UnixStream, dec: &mut FrameDecoder) -> (u64, DuplexStream) {
        let (io, id) = tokio::join!(client.open_port(80, Duration::from_secs(5)), async {
            let req = next_request(guest, dec).await;
            let Some(request::Body::PortOpen(o)) = req.body else { panic!("not an open: {req:?}") };
            assert_eq!((o.port, o.window), (80, HOST_WINDOW));
            send_event(guest, req.id, pb::PortEvent { opened: true, grant: 4096, ..Default::default() }).await;
            req.id
        });
        (id, io.unwrap())
    }

    #[tokio::test]
    async fn data_is_granted_back_as_charged_and_sends_stay_within_credit() {
        let (client, mut guest, _dir) = pair().await;
        let mut dec = FrameDecoder::new();
        let (id, mut io) = open(&client, &mut guest, &mut dec).await;
        send_event(&mut guest, id, pb::PortEvent { data: b"0123456789".to_vec(), ..Default::default() }).await;
        let mut got = [0u8; 10];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"0123456789");
        let req = next_request(&mut guest, &mut dec).await;
        let Some(request::Body::PortSend(s)) = req.body else { panic!("{req:?}") };
        assert_eq!((s.target_id, s.grant), (id, PORT_MIN_CHARGE), "ten bytes cost the minimum charge");
        // 6000 bytes with 4096 of credit: only 4096 go until more is granted.
        io.write_all(&[7u8; 6000]).await.unwrap();
        let mut sent = 0;
        while sent < 4096 {
            let req = next_request(&mut guest, &mut dec).await;
            let Some(request::Body::PortSend(s)) = req.body else { panic!("{req:?}") };
            sent += s.data.len();
        }
        assert_eq!(sent, 4096);
        let more = tokio::time::timeout(Duration::from_millis(300), next_request(&mut guest, &mut dec)).await;
        assert!(more.is_err(), "nothing past the credit");
        send_event(&mut guest, id, pb::PortEvent { grant: 8192, ..Default::default() }).await;
        let req = next_request(&mut guest, &mut dec).await;
        let Some(request::Body::PortSend(s)) = req.body else { panic!("{req:?}") };
        assert_eq!(s.data.len(), 6000 - 4096);
    }

    #[tokio::test]
    async fn a_guest_past_its_credit_loses_the_stream_not_the_channel() {
        let (client, mut guest, _dir) = pair().await;
        let mut dec = FrameDecoder::new();
        let (id, mut io) = open(&client, &mut guest, &mut dec).await;
        // Twice the window, without waiting for a grant.
        let mut flood = Vec::new();
        for _ in 0..(2 * HOST_WINDOW / PORT_MIN_CHARGE) {
            flood.extend(encode_frame(&pb::Response {
                id,
                body: Some(response::Body::PortEvent(pb::PortEvent {
                    data: vec![1; PORT_MIN_CHARGE as usize],
                    ..Default::default()
                })),
            }));
        }
        guest.write_all(&flood).await.unwrap();
        // Nobody reads `io` meanwhile; then the stream ends short of the flood.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut all)).await.unwrap().unwrap();
        // What got through is bounded by the credit given (the window and
        // the grants for what the consumer's buffer took), never the flood.
        let bound = (HOST_WINDOW as usize) + DUPLEX_BUFFER + QUEUE * PORT_MIN_CHARGE as usize;
        assert!(all.len() < bound.min(2 * HOST_WINDOW as usize), "the stream was cut: {} bytes got through", all.len());
        assert!(client.failure().is_none(), "the channel itself is fine");
        // The daemon told the guest to drop the stream.
        loop {
            let req = next_request(&mut guest, &mut dec).await;
            if let Some(request::Body::Cancel(c)) = req.body {
                assert_eq!(c.target_id, id);
                break;
            }
        }
    }
}
