//! The QMP client against a scripted QEMU over an in-memory pipe: replies
//! matched by id, events and stale replies skipped, deadlines, line bound.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

use super::*;

type TestConn = Conn<BufReader<ReadHalf<DuplexStream>>, WriteHalf<DuplexStream>>;

/// The client end, and QEMU's end (its reader of commands, its writer).
fn pipe() -> (TestConn, BufReader<ReadHalf<DuplexStream>>, WriteHalf<DuplexStream>) {
    let (a, b) = tokio::io::duplex(4 * MAX_LINE);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    (Conn::new(BufReader::new(ar), aw), BufReader::new(br), bw)
}

/// Reads one command on QEMU's side; returns (name, id).
async fn command(r: &mut BufReader<ReadHalf<DuplexStream>>) -> (String, Value) {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    (v["execute"].as_str().unwrap().to_string(), v["id"].clone())
}

async fn send(w: &mut WriteHalf<DuplexStream>, v: Value) {
    let mut b = serde_json::to_vec(&v).unwrap();
    b.push(b'\n');
    w.write_all(&b).await.unwrap();
}

const GREETING: &str = r#"{"QMP": {"version": {}, "capabilities": []}}"#;

#[tokio::test]
async fn replies_are_matched_by_id() {
    let (mut c, mut qr, mut qw) = pipe();
    let qemu = async {
        qw.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
        let (name, id) = command(&mut qr).await;
        assert_eq!(name, "qmp_capabilities");
        send(&mut qw, json!({"return": {}, "id": id})).await;
        let (name, id) = command(&mut qr).await;
        assert_eq!(name, "query-status");
        // An event, a reply to some other command, a reply with no id, and
        // one whose id is the right number spelled as a string: all skipped.
        send(&mut qw, json!({"event": "STOP", "timestamp": {}})).await;
        send(&mut qw, json!({"return": {"status": "wrong"}, "id": id.as_u64().unwrap() + 1})).await;
        send(&mut qw, json!({"return": {"status": "wrong"}})).await;
        send(&mut qw, json!({"return": {"status": "wrong"}, "id": id.to_string()})).await;
        send(&mut qw, json!({"return": {"status": "running"}, "id": id})).await;
    };
    let client = async {
        c.handshake(Duration::from_secs(5)).await.unwrap();
        c.execute_within("query-status", None, Duration::from_secs(5)).await.unwrap()
    };
    let ((), got) = tokio::join!(qemu, client);
    assert_eq!(got, json!({"status": "running"}));
}

#[tokio::test]
async fn a_late_reply_is_not_taken_for_the_next_command() {
    let (mut c, mut qr, mut qw) = pipe();
    let err = c.execute_within("stop", None, Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, VmmError::Timeout(_)), "{err}");
    let (_, late) = command(&mut qr).await;
    send(&mut qw, json!({"return": {"status": "late"}, "id": late})).await;
    let qemu = async {
        let (_, id) = command(&mut qr).await;
        send(&mut qw, json!({"return": {"status": "fresh"}, "id": id})).await;
    };
    let ((), got) = tokio::join!(qemu, c.execute_within("query-status", None, Duration::from_secs(5)));
    assert_eq!(got.unwrap(), json!({"status": "fresh"}));
}

#[tokio::test]
async fn errors_carry_a_bounded_description() {
    let (mut c, mut qr, mut qw) = pipe();
    let qemu = async {
        let (_, id) = command(&mut qr).await;
        send(&mut qw, json!({"error": {"class": "GenericError", "desc": "é".repeat(10_000)}, "id": id})).await;
    };
    let ((), got) = tokio::join!(qemu, c.execute_within("cont", None, Duration::from_secs(5)));
    let msg = got.unwrap_err().to_string();
    assert!(msg.len() < MAX_DESC + 100, "{} bytes", msg.len());
}

#[tokio::test]
async fn an_overlong_line_breaks_the_connection() {
    let (mut c, mut qr, mut qw) = pipe();
    let qemu = async {
        let _ = command(&mut qr).await;
        qw.write_all(&vec![b' '; MAX_LINE + 1]).await.unwrap();
        qw.write_all(b"\n").await.unwrap();
    };
    let ((), got) = tokio::join!(qemu, c.execute_within("cont", None, Duration::from_secs(5)));
    assert!(got.unwrap_err().to_string().contains("longer than"));
    let again = c.execute_within("cont", None, Duration::from_secs(5)).await.unwrap_err();
    assert!(again.to_string().contains("unusable"), "{again}");
}

#[tokio::test]
async fn a_silent_or_wrong_greeting_fails_in_time() {
    let (mut c, _qr, _qw) = pipe();
    let err = c.handshake(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, VmmError::Timeout(_)), "{err}");

    let (mut c, _qr, mut qw) = pipe();
    send(&mut qw, json!({"return": {}})).await;
    assert!(c.handshake(Duration::from_secs(5)).await.is_err());
}

#[tokio::test]
async fn a_partial_line_survives_a_deadline() {
    let (mut c, mut qr, mut qw) = pipe();
    let first = async {
        let (_, id) = command(&mut qr).await;
        let line = serde_json::to_vec(&json!({"return": 1, "id": id})).unwrap();
        qw.write_all(&line[..5]).await.unwrap();
        line
    };
    let (line, got) = tokio::join!(first, c.execute_within("a", None, Duration::from_millis(50)));
    assert!(matches!(got, Err(VmmError::Timeout(_))));
    // The rest of that reply arrives, then the answer to the next command.
    qw.write_all(&line[5..]).await.unwrap();
    qw.write_all(b"\n").await.unwrap();
    let second = async {
        let (_, id) = command(&mut qr).await;
        send(&mut qw, json!({"return": 2, "id": id})).await;
    };
    let ((), got) = tokio::join!(second, c.execute_within("b", None, Duration::from_secs(5)));
    assert_eq!(got.unwrap(), json!(2));
}
