//! Property tests of the QMP client against a hostile QEMU: arbitrary bytes
//! and JSON never panic the line parser; a reply is only ever taken for the
//! command whose id it echoes (events, other ids, ids spelled as strings or
//! floats are skipped); lines are split correctly in any chunking and none
//! longer than the bound is returned.
//!
//! Case counts are sized so each test finishes in seconds in a debug build.

use std::time::Duration;

use forkd_server::vmm::qemu::qmp::{Conn, QmpError, parse_line, read_line, reply_to};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        (0usize..8, any::<char>()).prop_map(|(n, c)| Value::from(c.to_string().repeat(n))),
    ];
    let key = prop_oneof![Just("id"), Just("return"), Just("error"), Just("desc"), Just("event"), Just("x")];
    leaf.prop_recursive(2, 8, 3, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// One line QEMU might send while the client waits for command `want`.
#[derive(Debug, Clone)]
enum Line {
    Event,
    Greeting,
    /// A reply; `ours` = echoes `want`, else some other id.
    Reply {
        ours: bool,
        other: u64,
        ret: Value,
        error: bool,
    },
    /// A reply whose id only looks like `want`.
    LookAlike(u8),
    NoId(Value),
    Any(Value),
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        Just(Line::Event),
        Just(Line::Greeting),
        (any::<bool>(), any::<u64>(), json_value(), prop::bool::weighted(0.2))
            .prop_map(|(ours, other, ret, error)| Line::Reply { ours, other, ret, error }),
        (0u8..4).prop_map(Line::LookAlike),
        json_value().prop_map(Line::NoId),
        json_value().prop_map(Line::Any),
    ]
}

fn render(l: &Line, want: u64) -> Value {
    match l {
        Line::Event => json!({"event": "STOP", "data": {}, "id": want}),
        Line::Greeting => json!({"QMP": {"version": {}}, "id": want}),
        Line::Reply { ours, other, ret, error } => {
            let id = if *ours {
                want
            } else if *other == want {
                want.wrapping_add(1)
            } else {
                *other
            };
            if *error {
                json!({"error": {"class": "GenericError", "desc": ret.to_string()}, "id": id})
            } else {
                json!({"return": ret, "id": id})
            }
        }
        Line::LookAlike(k) => {
            let id = match k {
                0 => json!(want.to_string()),
                1 => json!(want as f64 + 0.5),
                2 => json!([want]),
                _ => json!({"id": want}),
            };
            json!({"return": "look-alike", "id": id})
        }
        Line::NoId(v) => json!({"return": v}),
        Line::Any(v) => v.clone(),
    }
}

/// Whether `v` is a reply echoing exactly `want` (the test's own reading
/// of the protocol, independent of the client's).
fn echoes(v: &Value, want: u64) -> bool {
    v.get("event").is_none() && v.get("QMP").is_none() && v.get("id") == Some(&Value::from(want))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = parse_line(&b);
        let _ = reply_to(&b, 7);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 30_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_reply_is_taken_for_the_wrong_id(lines in prop::collection::vec(line(), 1..4), want in any::<u64>()) {
        for l in &lines {
            let bytes = serde_json::to_vec(&render(l, want)).unwrap();
            // What was actually sent (floats need not survive a round trip).
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            match reply_to(&bytes, want) {
                Ok(Some(r)) => {
                    prop_assert!(echoes(&v, want), "{v} taken as the reply to {want}");
                    if let Line::Reply { error: false, .. } = l {
                        prop_assert_eq!(Ok(v["return"].clone()), r);
                    }
                }
                Ok(None) | Err(_) => prop_assert!(!matches!(l, Line::Reply { ours: true, .. }), "{v} missed"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn lines_split_in_any_chunking_within_the_bound(
        b in prop::collection::vec(any::<u8>(), 0..160).prop_map(|b| b.into_iter().map(|c| if c >= 200 { b'\n' } else { c }).collect::<Vec<u8>>()),
        cap in 1usize..32,
        max in 0usize..40,
    ) {
        let mut r = tokio::io::BufReader::with_capacity(cap, &b[..]);
        let mut partial = vec![];
        let mut at = 0;
        loop {
            match futures::executor::block_on(read_line(&mut r, &mut partial, max)) {
                Ok(line) => {
                    prop_assert!(line.len() <= max);
                    prop_assert_eq!(&b[at..at + line.len()], &line[..]);
                    at += line.len();
                    prop_assert_eq!(b[at], b'\n');
                    at += 1;
                }
                Err(QmpError::Closed) => {
                    // Only an unterminated tail (no longer than the bound) is left.
                    prop_assert!(!b[at..].contains(&b'\n'));
                    prop_assert!(b.len() - at <= max);
                    break;
                }
                Err(QmpError::LineTooLong) => {
                    let end = b[at..].iter().position(|&c| c == b'\n').unwrap_or(b.len() - at);
                    prop_assert!(end > max);
                    prop_assert!(partial.len() <= max);
                    break;
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}

proptest! {
    // Whole exchanges over a pipe: slower per case.
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn execute_returns_the_reply_to_its_own_id(lines in prop::collection::vec(line(), 0..6), ret in json_value()) {
        let got: Result<(Value, Value, Vec<Value>), String> = runtime().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            let (ar, aw) = tokio::io::split(a);
            let (br, mut bw) = tokio::io::split(b);
            let mut conn = Conn::new(BufReader::new(ar), aw);
            let qemu = async {
                let mut br = BufReader::new(br);
                let mut cmd = String::new();
                br.read_line(&mut cmd).await.unwrap();
                let id = serde_json::from_str::<Value>(&cmd).unwrap()["id"].as_u64().unwrap();
                let mut sent = vec![];
                for l in lines.iter().map(|l| render(l, id)).chain([json!({"return": ret, "id": id})]) {
                    let text = format!("{l}\n");
                    bw.write_all(text.as_bytes()).await.unwrap();
                    sent.push(serde_json::from_str::<Value>(&text).unwrap());
                }
                (id, sent)
            };
            let (r, (id, sent)) = tokio::join!(conn.execute_within("query-status", None, Duration::from_secs(5)), qemu);
            r.map(|v| (v, Value::from(id), sent)).map_err(|e| e.to_string())
        });
        let first_ours = |sent: &[Value], id: &Value| sent.iter().find(|v| v.get("event").is_none() && v.get("QMP").is_none() && v.get("id") == Some(id)).cloned();
        match got {
            Ok((v, id, sent)) => {
                let first = first_ours(&sent, &id).unwrap();
                prop_assert_eq!(Some(&v), first.get("return"));
            }
            // A junk line or an error reply ends the command; which ever it
            // was, it was not a reply to another id taken as ours.
            Err(e) => prop_assert!(!e.contains("timed out"), "{e}"),
        }
    }
}
