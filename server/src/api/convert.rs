//! Domain records → protobuf messages.

use forkd_api::v1 as api;

use crate::core::sandboxes::Sandbox;
use crate::core::snapshots::SnapshotView;
use crate::core::store::SandboxRecord;

pub fn snapshot(v: &SnapshotView) -> api::Snapshot {
    let r = &v.record;
    api::Snapshot {
        tag: r.tag.to_string(),
        status: r.status.as_str().into(),
        status_reason: r.status_reason.clone(),
        image: r.image.clone(),
        vcpus: r.vcpus,
        mem_mib: r.mem_mib,
        kind: r.kind.clone(),
        parent_tag: r.parent_tag.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        ancestors: v.ancestors.clone(),
        dependents: v.dependents.clone(),
        chain_depth: v.ancestors.len() as u32,
        logical_size_bytes: r.mem_mib as u64 * 1024 * 1024,
        physical_size_bytes: r.physical_size_bytes,
        memory_digest: r.memory_digest.clone(),
        state_digest: r.state_digest.clone(),
        parent_memory_digest: r.parent_memory_digest.clone(),
        created_at_unix: r.created_at_unix,
        branched_from: r.branched_from.clone(),
        pause_ms_exact: r.pause_ms,
        pause_ms: r.pause_ms.ceil() as u64,
        dirty_bytes: r.dirty_bytes,
        dir: v.files.dir.clone(),
        bootable: v.bootable,
        warning: String::new(),
        diff_ms: r.diff_ms,
        diff_physical_bytes: if r.branched_from.is_empty() { 0 } else { r.dirty_bytes },
        diff_logical_bytes: if r.branched_from.is_empty() { 0 } else { r.mem_mib as u64 * 1024 * 1024 },
        vmstate_bytes: v.files.vmstate_bytes,
        backend: r.backend.clone(),
        accel: r.accel.clone(),
        volumes: r.volumes.clone(),
        labels: r.labels.clone().into_iter().collect(),
        live_sandboxes: v.live_sandboxes,
        volume_slots: r.vm.as_ref().map(|s| s.drives.iter().filter(|d| d.slot).count() as u32).unwrap_or(0),
        warm_ms: r.warm_ms,
        runtime: r.runtime.clone(),
        owner: r.owner.clone(),
        shared: r.shared,
    }
}

pub fn sandbox(r: &SandboxRecord, last_active: i64) -> api::Sandbox {
    let s = &r.settings;
    api::Sandbox {
        id: r.id.to_string(),
        snapshot_tag: r.snapshot_tag.to_string(),
        pid: r.pid,
        created_at_unix: r.created_at_unix,
        status: r.status.as_str().into(),
        status_reason: r.status_reason.clone(),
        hostname: r.hostname.clone(),
        memory_limit_mib: s.memory_limit_mib,
        cpu_quota: s.cpu_quota,
        pids_limit: s.pids_limit,
        network: if s.network.is_empty() { "none".into() } else { s.network.clone() },
        allow: s.allow.clone(),
        volumes: s.volumes.clone(),
        labels: s.labels.clone().into_iter().collect(),
        ttl_secs: s.ttl_secs,
        idle_timeout_secs: s.idle_timeout_secs,
        expires_at_unix: r.expires_at_unix,
        spawn_ms: r.spawn_ms,
        workspace: r.workspace.clone(),
        backend: r.backend.clone(),
        accel: r.accel.clone(),
        last_active_unix: last_active,
        owner: r.owner.clone(),
        guest_addr: r
            .net
            .as_ref()
            .map(|n| n.guest_cidr.split('/').next().unwrap_or_default().to_string())
            .unwrap_or_default(),
        netns: r.net.as_ref().map(|n| n.netns.clone()).unwrap_or_default(),
        has_branched: r.branch_count > 0,
        branch_count: r.branch_count,
        spawn_phases: Some(api::SpawnPhases {
            prepared_ms: r.spawn_phases.prepared_ms,
            restored_ms: r.spawn_phases.restored_ms,
            resumed_ms: r.spawn_phases.resumed_ms,
            reinit_ms: r.spawn_phases.reinit_ms,
            pooled: r.spawn_phases.pooled,
            guest_steps: Some(guest_steps(&r.spawn_phases.guest_steps)),
        }),
    }
}

fn guest_steps(g: &crate::core::store::GuestSteps) -> api::GuestReinitSteps {
    api::GuestReinitSteps {
        clock_ms: g.clock_ms,
        entropy_ms: g.entropy_ms,
        hostname_ms: g.hostname_ms,
        reseed_ms: g.reseed_ms,
        network_ms: g.network_ms,
        pids_ms: g.pids_ms,
    }
}

pub fn live_sandbox(sb: &Sandbox) -> api::Sandbox {
    sandbox(&sb.snapshot(), sb.last_active())
}

pub fn pool(i: crate::core::pool::PoolInfo) -> api::Pool {
    api::Pool {
        tag: i.tag,
        ready: i.ready as u32,
        filling: i.filling as u32,
        target: i.target as u32,
        network: i.network,
    }
}
