//! Every VMM is confined, with the daemon started as the shipped systemd
//! unit starts it: under the unit's capability bounding set (read from
//! deploy/systemd/forkd-server.service) and with no_new_privs. Each QEMU
//! must run as its own non-zero uid with no capability, under seccomp, in a
//! mount namespace where the host's secrets, the daemon's state and the
//! other sandboxes' files do not exist.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use forkd_integration::{Daemon, Options, memory_cgroup_of, vmms_under};
use serde_json::json;

fn status_field(status: &str, key: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).unwrap_or_default()
}

/// What the process sees at `path` (through its own root).
fn exists_for(pid: u32, path: &Path) -> bool {
    PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap()).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_are_jailed_under_the_units_capabilities() {
    let _serial = serial().await;
    let bounding = unit_bounding_set();
    let d = Daemon::start(Options {
        wrapper: vec!["setpriv".into(), format!("--bounding-set={bounding}"), "--no-new-privs".into()],
        token: Some(forkd_integration::TEST_TOKEN.into()),
        ..Default::default()
    });
    post_ok(&d, "/v1/snapshots", json!({ "tag": "jailed", "image": "minimal" })).await;
    // The bake's VMM is confined like a sandbox's, in a cgroup of its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let bake = loop {
        if let Some(pid) = vmms_under(&d.data_dir).first() {
            break *pid;
        }
        assert!(std::time::Instant::now() < deadline, "no bake VMM appeared");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // It enters its cgroup once QEMU answers on its control socket.
    let mut bake_cgroup = memory_cgroup_of(bake);
    while !bake_cgroup.starts_with("/forkd/") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        bake_cgroup = memory_cgroup_of(bake);
    }
    assert!(bake_cgroup.starts_with("/forkd/bake-"), "bake VMM in {bake_cgroup}");
    let status = std::fs::read_to_string(format!("/proc/{bake}/status")).unwrap();
    assert_eq!(u64::from_str_radix(&status_field(&status, "CapEff:"), 16).unwrap(), 0, "bake VMM CapEff");
    assert_eq!(status_field(&status, "Seccomp:"), "2", "bake VMM runs under seccomp");
    assert_ne!(status_field(&status, "Uid:").split_whitespace().next().unwrap(), "0", "bake VMM runs as root");
    wait_ready(&d, "jailed").await;
    let leaf = bake_cgroup.trim_start_matches("/forkd/").to_string();
    assert!(!forkd_cgroups().contains(&leaf), "the bake's cgroup {leaf} is removed once it is done");
    let ids = fork(&d, "jailed", 2).await;
    let daemon_ns = std::fs::read_link(format!("/proc/{}/ns/mnt", d.pid())).unwrap();
    assert_eq!(vmms_under(&d.data_dir).len(), 2, "one VMM per sandbox");
    let mut pids = vec![];
    for id in &ids {
        let v: serde_json::Value = d.get(&format!("/v1/sandboxes/{id}")).send().await.unwrap().json().await.unwrap();
        pids.push(v["pid"].as_u64().unwrap() as u32);
    }
    let mut uids = std::collections::BTreeSet::new();
    let token_file = d.data_dir.join("test-token");
    assert!(token_file.exists());
    for (pid, id) in pids.iter().zip(&ids) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        for cap in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
            assert_eq!(u64::from_str_radix(&status_field(&status, cap), 16).unwrap(), 0, "VMM {pid} {cap}");
        }
        assert_eq!(status_field(&status, "Seccomp:"), "2", "VMM {pid} runs under seccomp");
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
        let uid: u32 = status_field(&status, "Uid:").split_whitespace().next().unwrap().parse().unwrap();
        assert_ne!(uid, 0, "VMM {pid} runs as root");
        uids.insert(uid);
        assert_ne!(std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(), daemon_ns, "own mount namespace");

        let own = d.data_dir.join("sandboxes").join(id);
        let other = ids.iter().find(|o| *o != id).map(|o| d.data_dir.join("sandboxes").join(o)).unwrap();
        let sees = |p: &Path| exists_for(*pid, p);
        assert!(sees(&own), "its own work dir");
        assert!(sees(Path::new("/usr/bin/qemu-system-x86_64")));
        for hidden in [
            PathBuf::from("/etc/shadow"),
            PathBuf::from("/etc/passwd"),
            token_file.clone(),
            d.data_dir.join("forkd.db"),
            other.clone(),
            other.join("agent.sock"),
            PathBuf::from("/proc/1/environ"),
            PathBuf::from("/root"),
        ] {
            assert!(!sees(&hidden), "VMM {pid} of {id} can see {}", hidden.display());
        }
    }
    assert_eq!(uids.len(), 2, "each VMM has its own uid: {uids:?}");

    // The sandboxes work as before: exec answers, and deleting leaves nothing.
    for id in &ids {
        let v = post_ok(&d, &format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["echo", "hi"] })).await;
        assert_eq!(v["stdout"], "hi\n");
    }
    post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;
    assert!(vmms_under(&d.data_dir).is_empty());
}
