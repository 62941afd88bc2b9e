//! Property tests of REST → protobuf decoding without a server: arbitrary
//! paths, query strings and JSON bodies (deep nesting, numbers beyond every
//! range, unknown and misspelt fields, values of the wrong type) give a
//! message or a clean `InvalidArgument`, never a panic. The whole request
//! path, server included, is covered more slowly by tests/inputs_prop.rs.
//!
//! Case counts are sized so the file finishes in seconds in a debug build.

use std::sync::OnceLock;

use proptest::prelude::*;
use prost_reflect::DescriptorPool;

use super::*;

struct Schema {
    routes: Vec<Route>,
    /// Every field name of every message: keys that sometimes hit.
    keys: Vec<String>,
    /// Literal path segments of every route.
    literals: Vec<String>,
}

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let pool = DescriptorPool::decode(forkd_api::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let routes = routes::load(&pool, forkd_api::SERVICES).expect("routes");
        let mut keys: Vec<String> =
            pool.all_messages().flat_map(|m| m.fields().map(|f| f.name().to_string()).collect::<Vec<_>>()).collect();
        keys.sort();
        keys.dedup();
        let mut literals: Vec<String> = routes
            .iter()
            .flat_map(|r| r.segments.iter())
            .filter_map(|s| match s {
                routes::Segment::Literal(l) => Some(l.clone()),
                routes::Segment::Var(_) => None,
            })
            .collect();
        literals.sort();
        literals.dedup();
        Schema { routes, keys, literals }
    })
}

/// Strings over `alphabet`: far cheaper to generate than regex strategies,
/// which dominate a debug build's time.
fn text(alphabet: &'static [u8], max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(0..alphabet.len(), 0..=max)
        .prop_map(move |ix| ix.into_iter().map(|i| alphabet[i] as char).collect())
}

fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max).prop_map(|c| c.into_iter().collect())
}

const PRINTABLE: &[u8] =
    b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => any::<prop::sample::Index>().prop_map(|i| {
            let k = &schema().keys;
            k[i.index(k.len())].clone()
        }),
        1 => text(b"abcdefgxyzABC_", 6),
        1 => Just("@type".to_string()),
    ]
}

/// Number and string texts that sit on or past some edge.
fn edge_leaf() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "1e999",
        "-1e999",
        "1e-999",
        "18446744073709551616",
        "-9223372036854775809",
        "9223372036854775807",
        "4294967296",
        "-2147483649",
        "1.5",
        "-0",
        "0.0",
        "1E2",
        "\"NaN\"",
        "\"Infinity\"",
        "\"-Infinity\"",
        "\"9223372036854775808\"",
        "\"18446744073709551615\"",
        "\"1e3\"",
        "\"AAAA\"",
        "\"not base64!\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"STATE_UNSPECIFIED\"",
        "123456789012345678901234567890123456789",
    ])
    .prop_map(str::to_string)
}

/// JSON text, mostly well-formed, shaped by the schema's field names.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap_or_else(|_| "0".into())),
        text(b"az09 ._/-", 8).prop_map(|s| format!("{s:?}")),
        edge_leaf(),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key(), inner), 0..3).prop_map(|kv| {
                let pairs: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", pairs.join(","))
            }),
        ]
    })
}

/// Bodies: schema-shaped JSON, deep nesting, damaged JSON, raw bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => json_text().prop_map(String::into_bytes),
        1 => (1usize..3000, any::<bool>()).prop_map(|(n, obj)| if obj {
            format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)).into_bytes()
        } else {
            format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()
        }),
        1 => (key(), 1usize..200).prop_map(|(k, n)| {
            format!("{}{{}}{}", format!("{{{k:?}:").repeat(n), "}".repeat(n)).into_bytes()
        }),
        1 => (json_text(), any::<prop::sample::Index>()).prop_map(|(t, i)| {
            let b = t.into_bytes();
            b[..i.index(b.len() + 1)].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..32),
    ]
}

/// Bodies for the path test: the body test covers JSON in depth.
fn small_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![]),
        Just(b"{}".to_vec()),
        edge_leaf().prop_map(String::into_bytes),
        (key(), edge_leaf()).prop_map(|(k, v)| format!("{{{k:?}:{v}}}").into_bytes()),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let value = prop_oneof![edge_leaf(), text(b"aZ09%+&=._-", 8), any::<i64>().prop_map(|n| n.to_string())];
    prop_oneof![
        1 => Just(String::new()),
        4 => prop::collection::vec((key(), value), 1..4)
            .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")),
        1 => text(PRINTABLE, 24),
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<prop::sample::Index>().prop_map(|i| {
            let l = &schema().literals;
            l[i.index(l.len())].clone()
        }),
        2 => text(b"az09._~-", 10),
        1 => prop::sample::select(vec!["", "..", "%2e%2e", "%2F", "%00", "%ff%fe", "%", "%zz", "sb-abc123"]).prop_map(str::to_string),
        1 => any_text(12),
    ]
}

/// Decodes the request as `handle` would; returns how many routes took it.
fn decode(path: &str, query: &str, body: &[u8]) -> Result<usize, TestCaseError> {
    let segments = path_segments(path);
    let mut matched = 0;
    for route in &schema().routes {
        let Some(vars) = route.match_path(&segments) else { continue };
        matched += 1;
        match request_message(route, vars, query, body) {
            Ok(msg) => {
                // An accepted message encodes and decodes back.
                let bytes = msg.encode_to_vec();
                prop_assert!(DynamicMessage::decode(route.rpc.input(), bytes.as_slice()).is_ok());
            }
            Err(RestError(code, _)) => prop_assert_eq!(code, Code::InvalidArgument),
        }
    }
    Ok(matched)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 30_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_paths_never_panic(segs in prop::collection::vec(segment(), 0..6), query in query(), body in small_body()) {
        decode(&format!("/{}", segs.join("/")), &query, &body)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every route, with its variables filled, so bodies and queries reach
    /// the decoder instead of missing every route.
    #[test]
    fn bodies_and_queries_on_every_route(route in any::<prop::sample::Index>(), var in segment(), query in query(), body in body()) {
        let routes = &schema().routes;
        let r = &routes[route.index(routes.len())];
        let path: Vec<String> = r.segments.iter().map(|s| match s {
            routes::Segment::Literal(l) => l.clone(),
            routes::Segment::Var(_) => percent_encoding::utf8_percent_encode(&var, percent_encoding::NON_ALPHANUMERIC).to_string(),
        }).collect();
        let matched = decode(&format!("/{}", path.join("/")), &query, &body)?;
        prop_assert!(matched >= 1 || var.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 30_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_as_path_query_and_body(path in any_text(32), query in any_text(32), body in prop::collection::vec(any::<u8>(), 0..48)) {
        decode(&path, &query, &body)?;
    }
}

#[test]
fn a_field_body_is_one_value() {
    // No route takes a single-field body today; build one to check the
    // splice cannot be escaped.
    let strings = |r: &Route| {
        r.rpc.input().fields().filter(|f| matches!(f.kind(), Kind::String) && !f.is_list()).collect::<Vec<_>>()
    };
    let mut r = schema().routes.iter().find(|r| r.body == "*" && strings(r).len() >= 2).unwrap().clone();
    let (field, other) = (strings(&r)[0].clone(), strings(&r)[1].clone());
    r.body = field.name().to_string();
    assert!(request_message(&r, vec![], "", b"\"x\"").is_ok());
    let escape = format!("\"x\", {:?}: \"y\"", other.name());
    assert!(request_message(&r, vec![], "", escape.as_bytes()).is_err());
}
