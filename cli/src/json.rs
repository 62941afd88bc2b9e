//! JSON views of API messages for `--json`.
//!
//! Keys are the proto field names, so output matches the API reference.
//! Unlike the canonical proto3 JSON mapping, 64-bit integers stay JSON
//! numbers: scripts compare sizes with `jq '.physical_size_bytes > 1e9'`, and
//! no value here comes near 2^53.

use std::collections::{BTreeMap, HashMap};

use forkd_api::v1::{
    DeleteSandboxesResponse, DeleteSnapshotResponse, DeleteWorkspaceResponse, EvalResponse, PingResponse, Pool,
    Sandbox, Snapshot, VersionInfo, Workspace,
};
use serde_json::{Value, json};

/// Labels with sorted keys, so output is stable between runs.
fn labels(map: &HashMap<String, String>) -> Value {
    json!(map.iter().collect::<BTreeMap<_, _>>())
}

pub fn snapshot(s: &Snapshot) -> Value {
    json!({
        "tag": s.tag,
        "status": s.status,
        "status_reason": s.status_reason,
        "image": s.image,
        "vcpus": s.vcpus,
        "mem_mib": s.mem_mib,
        "kind": s.kind,
        "parent_tag": s.parent_tag,
        "ancestors": s.ancestors,
        "dependents": s.dependents,
        "chain_depth": s.chain_depth,
        "logical_size_bytes": s.logical_size_bytes,
        "physical_size_bytes": s.physical_size_bytes,
        "memory_digest": s.memory_digest,
        "state_digest": s.state_digest,
        "parent_memory_digest": s.parent_memory_digest,
        "created_at_unix": s.created_at_unix,
        "branched_from": s.branched_from,
        "pause_ms": s.pause_ms,
        "pause_ms_exact": s.pause_ms_exact,
        "dirty_bytes": s.dirty_bytes,
        "dir": s.dir,
        "bootable": s.bootable,
        "warning": s.warning,
        "diff_ms": s.diff_ms,
        "diff_physical_bytes": s.diff_physical_bytes,
        "diff_logical_bytes": s.diff_logical_bytes,
        "vmstate_bytes": s.vmstate_bytes,
        "backend": s.backend,
        "accel": s.accel,
        "volumes": s.volumes,
        "volume_slots": s.volume_slots,
        "labels": labels(&s.labels),
        "live_sandboxes": s.live_sandboxes,
        "warm_ms": s.warm_ms,
        "runtime": s.runtime,
        "owner": s.owner,
        "shared": s.shared,
    })
}

pub fn sandbox(s: &Sandbox) -> Value {
    json!({
        "id": s.id,
        "snapshot_tag": s.snapshot_tag,
        "pid": s.pid,
        "created_at_unix": s.created_at_unix,
        "status": s.status,
        "status_reason": s.status_reason,
        "hostname": s.hostname,
        "memory_limit_mib": s.memory_limit_mib,
        "cpu_quota": s.cpu_quota,
        "pids_limit": s.pids_limit,
        "network": s.network,
        "allow": s.allow,
        "volumes": s.volumes,
        "labels": labels(&s.labels),
        "ttl_secs": s.ttl_secs,
        "idle_timeout_secs": s.idle_timeout_secs,
        "expires_at_unix": s.expires_at_unix,
        "spawn_ms": s.spawn_ms,
        "workspace": s.workspace,
        "backend": s.backend,
        "accel": s.accel,
        "last_active_unix": s.last_active_unix,
        "owner": s.owner,
        "guest_addr": s.guest_addr,
        "netns": s.netns,
        "has_branched": s.has_branched,
        "branch_count": s.branch_count,
    })
}

pub fn workspace(w: &Workspace) -> Value {
    json!({
        "name": w.name,
        "status": w.status,
        "status_reason": w.status_reason,
        "live_sandbox_id": w.live_sandbox_id,
        "source_snapshot_tag": w.source_snapshot_tag,
        "state_tag": w.state_tag,
        "memory_limit_mib": w.memory_limit_mib,
        "cpu_quota": w.cpu_quota,
        "network": w.network,
        "volumes": w.volumes,
        "labels": labels(&w.labels),
        "ttl_secs": w.ttl_secs,
        "idle_timeout_secs": w.idle_timeout_secs,
        "created_at_unix": w.created_at_unix,
        "updated_at_unix": w.updated_at_unix,
        "suspended_at_unix": w.suspended_at_unix,
        "owner": w.owner,
    })
}

pub fn version_info(v: &VersionInfo) -> Value {
    json!({
        "version": v.version,
        "api": v.api,
        "backend": v.backend,
        "accel": v.accel,
        "accel_reason": v.accel_reason,
        "git_commit": v.git_commit,
        "data_dir": v.data_dir,
        "sandboxes": v.sandboxes,
        "snapshots": v.snapshots,
        "vmm_confinement": v.vmm_confinement,
        "auth": v.auth,
    })
}

pub fn delete_snapshot(r: &DeleteSnapshotResponse) -> Value {
    json!({ "deleted": r.deleted, "orphaned": r.orphaned })
}

pub fn delete_sandboxes(r: &DeleteSandboxesResponse) -> Value {
    json!({ "deleted": r.deleted })
}

pub fn delete_workspace(r: &DeleteWorkspaceResponse) -> Value {
    json!({ "deleted_snapshots": r.deleted_snapshots })
}

pub fn eval(r: &EvalResponse) -> Value {
    json!({
        "result": r.result,
        "error": r.error,
        "exit_code": r.exit_code,
        "stdout": r.stdout,
        "stderr": r.stderr,
    })
}

pub fn ping(r: &PingResponse) -> Value {
    json!({
        "ok": r.ok,
        "latency_ms": r.latency_ms,
        "uptime_secs": r.uptime_secs,
        "runtime_ready": r.runtime_ready,
    })
}

pub fn pool(p: &Pool) -> Value {
    json!({ "tag": p.tag, "ready": p.ready, "filling": p.filling, "target": p.target, "network": p.network })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_numbers() {
        let s = Snapshot {
            tag: "py".into(),
            logical_size_bytes: 1 << 40,
            physical_size_bytes: 12_345,
            created_at_unix: 1_700_000_000,
            pause_ms: 2,
            pause_ms_exact: 1.5,
            chain_depth: 2,
            labels: [("b".into(), "2".into()), ("a".into(), "1".into())].into(),
            ..Default::default()
        };
        let v = snapshot(&s);
        assert_eq!(v["logical_size_bytes"].as_u64(), Some(1 << 40));
        assert_eq!(v["physical_size_bytes"].as_u64(), Some(12_345));
        assert_eq!(v["created_at_unix"].as_i64(), Some(1_700_000_000));
        assert_eq!(v["pause_ms"].as_u64(), Some(2));
        assert_eq!(v["pause_ms_exact"].as_f64(), Some(1.5));
        assert_eq!(v["chain_depth"].as_u64(), Some(2));
        assert!(v["ancestors"].is_array());
        assert_eq!(v["labels"]["a"], "1");
        // Sorted keys make the text stable.
        let text = serde_json::to_string(&v["labels"]).unwrap();
        assert_eq!(text, r#"{"a":"1","b":"2"}"#);

        let sb = sandbox(&Sandbox { pid: 42, cpu_quota: 0.5, ..Default::default() });
        assert_eq!(sb["pid"].as_u64(), Some(42));
        assert_eq!(sb["cpu_quota"].as_f64(), Some(0.5));
        let ws = workspace(&Workspace { memory_limit_mib: 1024, ..Default::default() });
        assert_eq!(ws["memory_limit_mib"].as_u64(), Some(1024));
        let vi = version_info(&VersionInfo { sandboxes: 3, ..Default::default() });
        assert_eq!(vi["sandboxes"].as_u64(), Some(3));
    }

    #[test]
    fn every_snapshot_field_is_present() {
        // Field count of forkd.v1.Snapshot; a new field must be added here.
        let v = snapshot(&Snapshot::default());
        assert_eq!(v.as_object().unwrap().len(), 38);
        assert_eq!(sandbox(&Sandbox::default()).as_object().unwrap().len(), 27);
        assert_eq!(workspace(&Workspace::default()).as_object().unwrap().len(), 17);
        assert_eq!(version_info(&VersionInfo::default()).as_object().unwrap().len(), 11);
    }
}
