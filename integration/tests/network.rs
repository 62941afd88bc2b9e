//! `network: "nat"`: a namespace and tap per sandbox, default-deny egress
//! with an allow-list. The only peer is a network namespace this test makes
//! itself (addresses in the 198.18.0.0/15 benchmarking range).

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
/// and 8081.
struct Peer {
    ns: String,
    link: String,
    servers: Vec<Child>,
}

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
        for port in ["8080", "8081"] {
            let c = Command::new("ip")
                .args(["netns", "exec", &ns, "python3", "-m", "http.server", port, "--bind", "198.19.0.2"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            p.servers.push(c);
        }
        // Wait until both servers answer from the host side of the link.
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [8080u16, 8081] {
            let addr = std::net::SocketAddr::from(([198, 19, 0, 2], port));
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
        json!({ "snapshot_tag": "net", "per_child_netns": true }),
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
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
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
    drop(peer);
}
