//! `network: "nat"`: a namespace and tap per sandbox, default-deny egress
//! with an allow-list, intersected with the operator's deny-list. The only
//! peers are a network namespace this test makes itself (addresses in the
//! 198.18.0.0/15 benchmarking range, plus 169.254.169.254 on its loopback,
//! reached only by sandbox traffic through a policy route this test adds)
//! and a server on the host's own end of the test link.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::wait_ready;
use forkd_integration::{Daemon, Options};
use serde_json::{Value, json};

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false)
}

/// A test host in its own namespace at 198.19.0.2, serving HTTP on 8080
/// and 8081, and as a stand-in metadata service at 169.254.169.254:8080
/// for traffic from sandbox links only; plus a server on the host's own
/// address 198.19.0.1:8082.
struct Peer {
    ns: String,
    link: String,
    servers: Vec<Child>,
}

/// Policy routing table sending sandbox traffic for 169.254.169.254 into
/// the peer namespace (the host's own traffic keeps its routes).
const METADATA_TABLE: &str = "1717";

impl Peer {
    fn start() -> Peer {
        let ns = format!("fkt-peer-{}", std::process::id());
        let link = format!("fktp{}", std::process::id() % 100000);
        let mut p = Peer { ns: ns.clone(), link: link.clone(), servers: vec![] };
        assert!(ip(&["netns", "add", &ns]), "ip netns add (needs root)");
        assert!(ip(&["link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns]));
        assert!(ip(&["addr", "add", "198.19.0.1/30", "dev", &link]));
        assert!(ip(&["link", "set", &link, "up"]));
        for args in [
            vec!["addr", "add", "198.19.0.2/30", "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", "198.19.0.1"],
        ] {
            let mut full = vec!["netns", "exec", &ns, "ip"];
            full.extend(args);
            assert!(ip(&full), "{full:?}");
        }
        assert!(ip(&["netns", "exec", &ns, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]));
        assert!(ip(&["rule", "add", "from", "198.19.128.0/17", "lookup", METADATA_TABLE, "pref", METADATA_TABLE]));
        assert!(ip(&["route", "add", "169.254.169.254/32", "via", "198.19.0.2", "table", METADATA_TABLE]));
        let serve = |netns: Option<&str>, port: &str, bind: &str| {
            let mut c = match netns {
                Some(n) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", n, "python3"]);
                    c
                }
                None => Command::new("python3"),
            };
            c.args(["-m", "http.server", port, "--bind", bind])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        for port in ["8080", "8081"] {
            p.servers.push(serve(Some(&ns), port, "198.19.0.2"));
        }
        p.servers.push(serve(Some(&ns), "8080", "169.254.169.254"));
        p.servers.push(serve(None, "8082", "198.19.0.1"));
        // Wait until both servers answer from the host side of the link.
        let deadline = Instant::now() + Duration::from_secs(30);
        for (host, port) in [([198, 19, 0, 2], 8080u16), ([198, 19, 0, 2], 8081), ([198, 19, 0, 1], 8082)] {
            let addr = std::net::SocketAddr::from((host, port));
            while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(Instant::now() < deadline, "peer server on {port} did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        p
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        ip(&["route", "del", "169.254.169.254/32", "table", METADATA_TABLE]);
        ip(&["rule", "del", "from", "198.19.128.0/17", "lookup", METADATA_TABLE, "pref", METADATA_TABLE]);
        ip(&["link", "del", &self.link]);
        ip(&["netns", "del", &self.ns]);
    }
}

async fn fetch(d: &Daemon, id: &str, url: &str) -> Value {
    let code = format!("import urllib.request; urllib.request.urlopen({url:?}, timeout=4); print('reached')");
    let r = d
        .post(&format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["python3", "-c", code], "timeout_secs": 30 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(name).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_allows_only_the_allow_list() {
    let peer = Peer::start();
    let d = Daemon::start(Options::default());
    d.post("/v1/snapshots", json!({ "tag": "net", "image": "python" })).send().await.unwrap();
    wait_ready(&d, "net").await;

    // Bad allow-lists and contradictions change nothing.
    for body in [
        json!({ "snapshot_tag": "net", "network": "nat", "allow": ["198.19.0.2/33"] }),
        json!({ "snapshot_tag": "net", "network": "none", "allow": ["198.19.0.2"] }),
        json!({ "snapshot_tag": "net", "network": "bridge" }),
        json!({ "snapshot_tag": "net", "network": "none", "per_child_netns": true }),
    ] {
        let r = d.post("/v1/sandboxes", body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }

    let r = d
        .post(
            "/v1/sandboxes",
            json!({ "snapshot_tag": "net", "n": 1, "network": "nat", "allow": ["198.19.0.2/32:8080"] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let nat: Value = r.json().await.unwrap();
    let id = nat[0]["id"].as_str().unwrap().to_string();
    assert_eq!(nat[0]["network"], "nat");
    let ns = format!("forkd-{}", &id[3..]);
    assert!(netns_exists(&ns), "the sandbox's namespace exists");

    let ok = fetch(&d, &id, "http://198.19.0.2:8080/").await;
    assert_eq!(ok["exit_code"], 0, "allowed address and port: {ok}");
    assert_eq!(ok["stdout"], "reached\n");
    let port = fetch(&d, &id, "http://198.19.0.2:8081/").await;
    assert_ne!(port["exit_code"], 0, "a port outside the allow-list: {port}");
    let host = fetch(&d, &id, "http://198.19.0.1:8080/").await;
    assert_ne!(host["exit_code"], 0, "an address outside the allow-list: {host}");

    // The operator's deny-list: an allow entry wholly inside it is refused
    // naming `allow`; one that overlaps it is accepted and the overlap
    // stays denied.
    for inside in ["169.254.169.254", "169.254.0.0/16:80", "198.19.0.1/32", "127.0.0.1:8889", "198.18.0.6"] {
        let r = d
            .post("/v1/sandboxes", json!({ "snapshot_tag": "net", "network": "nat", "allow": [inside] }))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{inside}: {text}");
        assert!(text.contains("invalid allow") && text.contains("lies inside"), "{inside}: {text}");
    }
    let r = d
        .post("/v1/sandboxes", json!({ "snapshot_tag": "net", "n": 1, "network": "nat", "allow": ["0.0.0.0/0"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let wide: Value = r.json().await.unwrap();
    let wid = wide[0]["id"].as_str().unwrap().to_string();
    let wns = format!("forkd-{}", &wid[3..]);
    let reached = fetch(&d, &wid, "http://198.19.0.2:8081/").await;
    assert_eq!(reached["exit_code"], 0, "0.0.0.0/0 reaches the peer: {reached}");
    let metadata = fetch(&d, &wid, "http://169.254.169.254:8080/").await;
    assert_ne!(metadata["exit_code"], 0, "link-local (cloud metadata) is denied: {metadata}");
    let own = fetch(&d, &wid, "http://198.19.0.1:8082/").await;
    assert_ne!(own["exit_code"], 0, "the host's own address is denied: {own}");
    // The drops were the deny rules', which come before every accept.
    let out = Command::new("ip")
        .args(["netns", "exec", &wns, "nft", "list", "chain", "inet", "forkd", "forward"])
        .output()
        .unwrap();
    let chain = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = chain.lines().map(str::trim).collect();
    let rule = |needle: &str| {
        lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in\n{chain}"))
    };
    let first_accept = lines.iter().position(|l| l.ends_with("accept")).unwrap();
    for (needle, what) in [("169.254.0.0/16", "metadata"), ("198.19.0.1 ", "host address")] {
        let i = rule(needle);
        assert!(i < first_accept, "{what} deny rule after an accept:\n{chain}");
        let packets: u64 = lines[i]
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(packets > 0, "the {what} deny rule dropped nothing: {}", lines[i]);
    }
    d.post("/v1/sandboxes/delete", json!({ "ids": [wid] })).send().await.unwrap();

    // Without "nat" the NIC reaches nothing.
    let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "net", "n": 1 })).send().await.unwrap();
    let none: Value = r.json().await.unwrap();
    let nid = none[0]["id"].as_str().unwrap().to_string();
    let blocked = fetch(&d, &nid, "http://198.19.0.2:8080/").await;
    assert_ne!(blocked["exit_code"], 0, "network none reached the peer: {blocked}");

    // Killing removes the namespace, its links and rules.
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert!(!netns_exists(&ns), "namespace {ns} left behind");
    let links = String::from_utf8(Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).unwrap();
    assert!(!links.contains(&format!("fkh{}", &id[3..])), "host link left behind");

    nat_pool(&d).await;
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    let r = d.put("/v1/pools/net", json!({ "target": 0 })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir("/var/run/netns").unwrap().flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with("forkd-") && !forkd_integration::support::netns_before_tests().contains(&name)
    }) {
        assert!(Instant::now() < deadline, "an emptied nat pool left namespaces behind");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(peer);
}

/// The pool of "net" from GET /v1/pools.
async fn pool(d: &Daemon) -> Value {
    let pools: Value = d.get("/v1/pools").send().await.unwrap().json().await.unwrap();
    pools.as_array().unwrap().iter().find(|p| p["tag"] == "net").cloned().unwrap_or(Value::Null)
}

async fn wait_pool_ready(d: &Daemon, n: u64, network: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let p = pool(d).await;
        if p["ready"] == n && p["filling"] == 0 && p["network"] == network {
            return;
        }
        assert!(Instant::now() < deadline, "pool of net: {p}, expected {n} ready ({network})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Forks one "nat" child with `allow`: (id, taken from the pool).
async fn fork_nat(d: &Daemon, allow: &str) -> (String, bool) {
    let body = json!({ "snapshot_tag": "net", "n": 1, "network": "nat", "allow": [allow] });
    let r = d.post("/v1/sandboxes", body).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    (v[0]["id"].as_str().unwrap().to_string(), v[0]["spawn_phases"]["pooled"] == true)
}

/// A nat pool: children made with their namespace, tap and address and no
/// egress; each fork that takes one installs its own allow-list.
async fn nat_pool(d: &Daemon) {
    for (body, status) in
        [(json!({ "target": 2, "network": "bridge" }), 400), (json!({ "target": 2, "network": "nat" }), 200)]
    {
        let r = d.put("/v1/pools/net", body.clone()).send().await.unwrap();
        assert_eq!(r.status(), status, "{body}: {}", r.text().await.unwrap());
    }
    wait_pool_ready(d, 2, "nat").await;
    // Two namespaces wait, each the one of the id its child will serve as.
    let waiting: Vec<String> = std::fs::read_dir("/var/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("forkd-") && !forkd_integration::support::netns_before_tests().contains(n))
        .collect();
    assert_eq!(waiting.len(), 2, "{waiting:?}");

    // A fork without a network does not take a nat child.
    let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "net", "n": 1 })).send().await.unwrap();
    let none: Value = r.json().await.unwrap();
    assert_eq!(none[0]["spawn_phases"]["pooled"], false, "{none}");

    let (a, pooled) = fork_nat(d, "198.19.0.2/32:8080").await;
    assert!(pooled, "a nat fork takes a nat pool's child");
    assert!(waiting.contains(&format!("forkd-{}", &a[3..])), "its namespace was made with it");
    let (b, pooled) = fork_nat(d, "198.19.0.2/32:8081").await;
    assert!(pooled);
    // Each child has its own fork's rules, not the pool's and not its sibling's.
    for (id, open, shut) in [(&a, 8080, 8081), (&b, 8081, 8080)] {
        let ok = fetch(d, id, &format!("http://198.19.0.2:{open}/")).await;
        assert_eq!(ok["exit_code"], 0, "{id} to :{open}: {ok}");
        let no = fetch(d, id, &format!("http://198.19.0.2:{shut}/")).await;
        assert_ne!(no["exit_code"], 0, "{id} to :{shut}: {no}");
    }
    // Refilled with nat children; switching the pool to "none" replaces them.
    wait_pool_ready(d, 2, "nat").await;
    let r = d.put("/v1/pools/net", json!({ "target": 1, "network": "none" })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_pool_ready(d, 1, "none").await;
    let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "net", "n": 1 })).send().await.unwrap();
    let none: Value = r.json().await.unwrap();
    assert_eq!(none[0]["spawn_phases"]["pooled"], true, "{none}");
    let (_, pooled) = fork_nat(d, "198.19.0.2/32:8080").await;
    assert!(!pooled, "a none pool serves no nat fork");
}
