//! Property tests of every input parser the daemon has: no input panics,
//! and no accepted input names a path outside the data dir (or a cgroup
//! outside its hierarchy).
//!
//! - REST: the transcoder (route matching, path variables, query strings,
//!   JSON bodies → protobuf) with arbitrary methods, paths, queries and
//!   bodies, dispatching to a stub gRPC service; path templates.
//! - Names → paths: snapshot, staging and sandbox dirs under the data dir.
//! - Sandbox limits, volume specs, network allow-lists, cgroup names.

use std::path::{Component, Path, PathBuf};

use axum::body::{Body, Bytes};
use forkd_api::names::{SandboxId, Tag};
use forkd_server::core::limits::validate_limits;
use forkd_server::core::store::SandboxSettings;
use forkd_server::core::volumes::{VolumeSpec, parse_stored};
use forkd_server::edge::rest::routes::parse_template;
use forkd_server::edge::rest::transcode::Transcoder;
use forkd_server::host::cgroup::{Cgroups, parse_mountinfo};
use forkd_server::host::net::AllowRule;
use forkd_server::memory::Layout;
use proptest::prelude::*;

fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9._/\\-\0%:, ]{0,60}",
        Just("..".to_string()),
        Just("../../etc".to_string()),
        Just("%2e%2e".to_string()),
        Just("sb-abc".to_string()),
        Just("py".to_string()),
    ]
}

fn under(root: &Path, p: &Path) -> bool {
    p.starts_with(root) && !p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

/// A stub gRPC service: answers every call with the request's own frames
/// and an OK status, so responses are decoded as whatever the RPC returns.
fn echo_grpc() -> axum::Router {
    axum::Router::new().fallback(|body: Bytes| async move {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(Body::from(body))
            .unwrap()
    })
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1".to_string()),
        Just("sandboxes".to_string()),
        Just("snapshots".to_string()),
        Just("workspaces".to_string()),
        Just("exec".to_string()),
        Just("files".to_string()),
        Just("content".to_string()),
        Just("info".to_string()),
        Just("delete".to_string()),
        Just("sb-abc123".to_string()),
        Just("..".to_string()),
        Just("%2e%2e%2fetc".to_string()),
        Just("%00".to_string()),
        Just("%ff%fe".to_string()),
        "[a-zA-Z0-9._~%-]{0,12}",
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![]),
        any::<Vec<u8>>(),
        Just(b"{}".to_vec()),
        Just(br#"{"snapshot_tag":"../x","n":4294967295}"#.to_vec()),
        Just(br#"{"args":["sh"],"timeout_secs":-1}"#.to_vec()),
        Just(br#"{"tag":"a","image":"/etc/passwd","mem_mib":1e309}"#.to_vec()),
        Just(br#"{"path":"/x","data":"not base64!"}"#.to_vec()),
        Just(br#"[1,2,3]"#.to_vec()),
        Just(br#"{"labels":{"a":null}}"#.to_vec()),
        "\\{\"[a-z_]{1,16}\":(\"[^\"]{0,10}\"|[0-9-]{1,12}|true|null|\\[\\]|\\{\\})\\}".prop_map(String::into_bytes),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn rest_transcoder_never_panics(
        method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE"), Just("PATCH"), Just("HEAD"), Just("OPTIONS")],
        segs in proptest::collection::vec(segment(), 0..7),
        query in prop_oneof![Just(String::new()), "[a-z_]{1,10}=[a-zA-Z0-9%._-]{0,10}(&[a-z_]{1,8}=[^&#]{0,6}){0,2}"],
        body in body(),
        octet in any::<bool>(),
    ) {
        let rt = runtime();
        let t = Transcoder::new(echo_grpc(), 1 << 16).unwrap();
        let mut uri = format!("/{}", segs.join("/"));
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(&query);
        }
        let Ok(req) = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", if octet { "application/octet-stream" } else { "application/json" })
            .body(Body::from(body))
        else {
            return Ok(());
        };
        let resp = rt.block_on(async {
            let r = t.handle(req).await.unwrap();
            let (parts, b) = r.into_parts();
            let bytes = tokio::time::timeout(std::time::Duration::from_secs(5), axum::body::to_bytes(b, 1 << 24)).await;
            (parts.status, bytes)
        });
        prop_assert!(resp.0.as_u16() >= 200 && resp.0.as_u16() < 600);
        prop_assert!(resp.1.is_ok(), "the response body ends");
    }

    #[test]
    fn every_route_with_nasty_variables(route in any::<prop::sample::Index>(), vars in proptest::collection::vec(nasty(), 4), body in body(), same_method in any::<bool>()) {
        let rt = runtime();
        let t = Transcoder::new(echo_grpc(), 1 << 16).unwrap();
        let r = &t.routes()[route.index(t.routes().len())];
        let mut vi = 0;
        let path: Vec<String> = r.segments.iter().map(|seg| match seg {
            forkd_server::edge::rest::routes::Segment::Literal(l) => l.clone(),
            forkd_server::edge::rest::routes::Segment::Var(_) => {
                vi += 1;
                percent_encoding::utf8_percent_encode(&vars[(vi - 1) % vars.len()], percent_encoding::NON_ALPHANUMERIC).to_string()
            }
        }).collect();
        let method = if same_method { r.method.clone() } else { http::Method::PATCH };
        let req = http::Request::builder().method(method).uri(format!("/{}", path.join("/"))).header("content-type", "application/json").body(Body::from(body)).unwrap();
        let status = rt.block_on(async {
            let resp = t.handle(req).await.unwrap();
            let status = resp.status();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), axum::body::to_bytes(resp.into_body(), 1 << 24)).await;
            status
        });
        prop_assert!(status.as_u16() >= 200 && status.as_u16() < 600);
    }

    #[test]
    fn path_templates_never_panic(t in any::<String>()) {
        let _ = parse_template(&t);
        let _ = parse_template(&format!("/{t}"));
    }

    #[test]
    fn accepted_names_stay_under_the_data_dir(s in nasty(), nonce in "[a-z0-9]{0,8}") {
        let root = PathBuf::from("/var/lib/forkd-test");
        let layout = Layout::new(root.clone());
        if let Ok(tag) = Tag::parse(&s) {
            let d = layout.snapshot_dir(&tag);
            prop_assert!(under(&root.join("snapshots"), &d), "{}", d.display());
            prop_assert_eq!(d.parent(), Some(&*root.join("snapshots")));
            let st = layout.staging_for(&tag, &nonce);
            prop_assert!(under(&root.join("staging"), &st), "{}", st.display());
            prop_assert_eq!(st.parent(), Some(&*root.join("staging")));
        }
        if let Ok(id) = SandboxId::parse(&s) {
            let d = layout.sandbox_dir(&id);
            prop_assert_eq!(d.parent(), Some(&*root.join("sandboxes")));
            prop_assert!(under(&root, &d));
        }
    }

    #[test]
    fn limits_validation_never_panics(m in any::<u32>(), q in any::<f64>(), p in any::<u32>()) {
        let s = SandboxSettings { memory_limit_mib: m, cpu_quota: q, pids_limit: p, ..Default::default() };
        if validate_limits(&s).is_ok() {
            prop_assert!(m == 0 || m >= 64);
            prop_assert!(q == 0.0 || (0.01..=64.0).contains(&q));
            prop_assert!(p == 0 || p >= 8);
        }
    }

    #[test]
    fn volume_specs(host in prop_oneof![Just("HOSTFILE".to_string()), nasty()], guest in nasty(), suffix in prop_oneof![Just(""), Just(":ro"), Just(":rw"), Just(":x")]) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let host = if host == "HOSTFILE" { file.path().display().to_string() } else { host };
        let spec = format!("{host}:{guest}{suffix}");
        let root = forkd_server::host::paths::Root::new(file.path().parent().unwrap()).unwrap();
        if let Ok(v) = VolumeSpec::parse(&spec, &root) {
            for p in [v.host.as_path(), Path::new(&v.guest)] {
                prop_assert!(p.is_absolute());
                prop_assert!(!p.components().any(|c| matches!(c, Component::ParentDir)));
                prop_assert!(!p.to_string_lossy().contains(['\0', ',']));
            }
            prop_assert_ne!(v.guest.as_str(), "/");
            let back = parse_stored(&[v.to_spec_string()]);
            prop_assert_eq!(back, vec![v]);
        }
        let _ = parse_stored(&[spec]);
    }

    #[test]
    fn allow_lists(s in prop_oneof![nasty(), "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,2})?(:[0-9]{1,5})?"]) {
        if let Ok(r) = AllowRule::parse(&s) {
            prop_assert!(r.prefix <= 32);
            prop_assert_ne!(r.port, Some(0));
            let mask = if r.prefix == 0 { 0 } else { u32::MAX << (32 - r.prefix) };
            prop_assert_eq!(u32::from(r.addr) & !mask, 0);
            // What a rule renders from parses back to the same rule.
            let again = match r.port {
                Some(p) => format!("{}/{}:{p}", r.addr, r.prefix),
                None => format!("{}/{}", r.addr, r.prefix),
            };
            prop_assert_eq!(AllowRule::parse(&again).unwrap(), r);
        }
    }

    #[test]
    fn cgroup_names_stay_in_their_hierarchy(s in nasty()) {
        let mounts = parse_mountinfo("1 0 0:1 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n2 0 0:2 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n");
        let cg = Cgroups::from_mounts(&mounts).unwrap();
        for name in [s.clone(), format!("forkd/{s}")] {
            if let Ok(dirs) = cg.dirs(&name) {
                for d in dirs {
                    prop_assert!(under(Path::new("/sys/fs/cgroup"), &d), "{}", d.display());
                    prop_assert!(d.starts_with("/sys/fs/cgroup/memory") || d.starts_with("/sys/fs/cgroup/pids"));
                }
            }
        }
    }
}
