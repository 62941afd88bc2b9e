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
const EDGES: &[&str] = &[
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
];

fn edge_leaf() -> impl Strategy<Value = String> {
    prop::sample::select(EDGES).prop_map(str::to_string)
}

/// A splitmix64 stream: JSON is grown from a seed rather than from nested
/// proptest strategies, whose generation dominates a debug build's time.
/// A failing case still replays exactly from its seed.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn key(&mut self) -> String {
        let keys = &schema().keys;
        match self.below(10) {
            0 => "@type".to_string(),
            1 => (0..self.below(6)).map(|_| b"abcxyzAB_"[self.below(9)] as char).collect(),
            _ => keys[self.below(keys.len())].clone(),
        }
    }

    /// JSON text nested at most `depth` deep, shaped by the schema's keys.
    fn json(&mut self, depth: u32, out: &mut String) {
        use std::fmt::Write;
        match self.below(if depth == 0 { 7 } else { 9 }) {
            0 => out.push_str("null"),
            1 => out.push_str(if self.next() & 1 == 0 { "true" } else { "false" }),
            2 => write!(out, "{}", self.next() as i64).unwrap(),
            3 => write!(out, "{}", self.next() >> self.below(64)).unwrap(),
            4 => out.push_str(&serde_json::to_string(&f64::from_bits(self.next())).unwrap_or_else(|_| "0".into())),
            5 => {
                let s: String = (0..self.below(8)).map(|_| b"az09 ._/-"[self.below(9)] as char).collect();
                write!(out, "{s:?}").unwrap();
            }
            6 => out.push_str(EDGES[self.below(EDGES.len())]),
            7 => {
                out.push('[');
                for i in 0..self.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    self.json(depth - 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..self.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    let k = self.key();
                    write!(out, "{k:?}:").unwrap();
                    self.json(depth - 1, out);
                }
                out.push('}');
            }
        }
    }
}

impl Seeded {
    /// A JSON object for `desc`: mostly its own fields with values of
    /// roughly the right kind (so decoding gets past the field names), some
    /// of the wrong kind, out of range, or unknown.
    fn message(&mut self, desc: &prost_reflect::MessageDescriptor, depth: u32, out: &mut String) {
        use std::fmt::Write;
        let fields: Vec<FieldDescriptor> = desc.fields().collect();
        out.push('{');
        for i in 0..self.below(5) {
            if i > 0 {
                out.push(',');
            }
            if fields.is_empty() || self.below(10) == 0 {
                let k = self.key();
                write!(out, "{k:?}:").unwrap();
                self.json(depth.min(2), out);
                continue;
            }
            let f = &fields[self.below(fields.len())];
            let name = if self.next() & 1 == 0 { f.name() } else { f.json_name() };
            write!(out, "{name:?}:").unwrap();
            if self.below(8) == 0 {
                self.json(depth.min(2), out);
            } else if f.is_map() {
                out.push('{');
                if let Kind::Message(entry) = f.kind() {
                    for j in 0..self.below(3) {
                        if j > 0 {
                            out.push(',');
                        }
                        write!(out, "\"k{j}\":").unwrap();
                        match entry.map_entry_value_field().kind() {
                            Kind::Message(m) => self.nested(&m, depth, out),
                            k => self.scalar(&k, out),
                        }
                    }
                }
                out.push('}');
            } else if f.is_list() {
                out.push('[');
                for j in 0..self.below(3) {
                    if j > 0 {
                        out.push(',');
                    }
                    self.value(f, depth, out);
                }
                out.push(']');
            } else {
                self.value(f, depth, out);
            }
        }
        out.push('}');
    }

    fn value(&mut self, f: &FieldDescriptor, depth: u32, out: &mut String) {
        match f.kind() {
            Kind::Message(m) => self.nested(&m, depth, out),
            k => self.scalar(&k, out),
        }
    }

    fn nested(&mut self, m: &prost_reflect::MessageDescriptor, depth: u32, out: &mut String) {
        if depth == 0 {
            out.push_str("{}");
        } else {
            self.message(m, depth - 1, out);
        }
    }

    fn scalar(&mut self, kind: &Kind, out: &mut String) {
        use std::fmt::Write;
        if self.below(6) == 0 {
            out.push_str(EDGES[self.below(EDGES.len())]);
            return;
        }
        match kind {
            Kind::String => {
                let s: String = (0..self.below(10)).map(|_| b"az09 ./-_"[self.below(9)] as char).collect();
                write!(out, "{s:?}").unwrap();
            }
            Kind::Bool => out.push_str(if self.next() & 1 == 0 { "true" } else { "false" }),
            Kind::Bytes => out.push_str(["\"\"", "\"aGVsbG8=\"", "\"aGVsbG8\"", "\"_-8=\"", "\"%%\""][self.below(5)]),
            Kind::Enum(e) => {
                let values: Vec<_> = e.values().collect();
                match self.below(3) {
                    0 => write!(out, "{}", self.next() as i32).unwrap(),
                    _ => write!(out, "{:?}", values[self.below(values.len())].name()).unwrap(),
                }
            }
            Kind::Float | Kind::Double => {
                out.push_str(&serde_json::to_string(&f64::from_bits(self.next())).unwrap_or_else(|_| "0".into()))
            }
            // Integers, as numbers or as the strings proto JSON allows.
            _ => {
                let n = (self.next() >> self.below(64)) as i64;
                if self.next() & 1 == 0 {
                    write!(out, "{n}").unwrap();
                } else {
                    write!(out, "\"{n}\"").unwrap();
                }
            }
        }
    }
}

fn json_text() -> impl Strategy<Value = String> {
    (any::<u64>(), 0u32..5).prop_map(|(seed, depth)| {
        let mut out = String::new();
        Seeded(seed).json(depth, &mut out);
        out
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
        1 => (any::<u64>(), 1usize..200).prop_map(|(seed, n)| {
            let k = Seeded(seed).key();
            format!("{}{{}}{}", format!("{{{k:?}:").repeat(n), "}".repeat(n)).into_bytes()
        }),
        1 => (json_text(), any::<prop::sample::Index>()).prop_map(|(t, i)| {
            let b = t.into_bytes();
            b[..i.index(b.len() + 1)].to_vec()
        }),
        1 => (any::<u64>(), 0usize..32).prop_map(|(seed, n)| {
            let mut r = Seeded(seed);
            (0..n).map(|_| r.next() as u8).collect()
        }),
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
    #![proptest_config(ProptestConfig { cases: 60_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every route, with its variables filled, so bodies and queries reach
    /// the decoder instead of missing every route.
    #[test]
    fn bodies_and_queries_on_every_route(
        route in any::<prop::sample::Index>(),
        var in segment(),
        query in query(),
        shaped in prop::option::weighted(0.6, (any::<u64>(), 0u32..4)),
        body in body(),
    ) {
        let routes = &schema().routes;
        let r = &routes[route.index(routes.len())];
        let path: Vec<String> = r.segments.iter().map(|s| match s {
            routes::Segment::Literal(l) => l.clone(),
            routes::Segment::Var(_) => percent_encoding::utf8_percent_encode(&var, percent_encoding::NON_ALPHANUMERIC).to_string(),
        }).collect();
        // Mostly a body shaped by the route's own request message.
        let body = match shaped {
            Some((seed, depth)) => {
                let mut out = String::new();
                Seeded(seed).message(&r.rpc.input(), depth, &mut out);
                out.into_bytes()
            }
            None => body,
        };
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

#[test]
fn repeated_query_parameters_accumulate_in_order() {
    // No query-string route has a repeated field today; use any request
    // message that has one.
    let (desc, f) = schema()
        .routes
        .iter()
        .find_map(|r| {
            let input = r.rpc.input();
            let f = input.fields().find(|f| f.is_list() && matches!(f.kind(), Kind::String))?;
            Some((input, f))
        })
        .expect("a request with a repeated string field");
    let mut msg = DynamicMessage::new(desc);
    let n = 20_000;
    for i in 0..n {
        assert!(set_from_str(&mut msg, &f, &i.to_string()).is_ok());
    }
    let got = msg.get_field(&f);
    let list = got.as_list().expect("a list");
    assert_eq!(list.len(), n);
    assert_eq!(list[n - 1].as_str(), Some("19999"));
}
