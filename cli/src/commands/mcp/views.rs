//! JSON views of API messages for tool answers. Keys are the proto field
//! names, like `--json` output; listings use short views so a model's
//! context is not filled with digests and sizes it did not ask for.

use std::collections::BTreeMap;

use forkd_api::v1::{ExecResponse, FileInfo, ProcessInfo, Sandbox, Snapshot};
use serde_json::{Value, json};

/// A snapshot in a listing.
pub fn snapshot_brief(s: &Snapshot) -> Value {
    json!({
        "tag": s.tag,
        "status": s.status,
        "status_reason": s.status_reason,
        "kind": s.kind,
        "parent_tag": s.parent_tag,
        "image": s.image,
        "runtime": s.runtime,
        "vcpus": s.vcpus,
        "mem_mib": s.mem_mib,
        "live_sandboxes": s.live_sandboxes,
        "created_at_unix": s.created_at_unix,
        "labels": s.labels.iter().collect::<BTreeMap<_, _>>(),
    })
}

/// A sandbox in a listing or a fork's answer.
pub fn sandbox_brief(s: &Sandbox) -> Value {
    json!({
        "id": s.id,
        "snapshot_tag": s.snapshot_tag,
        "status": s.status,
        "status_reason": s.status_reason,
        "hostname": s.hostname,
        "created_at_unix": s.created_at_unix,
        "expires_at_unix": s.expires_at_unix,
        "workspace": s.workspace,
        "labels": s.labels.iter().collect::<BTreeMap<_, _>>(),
    })
}

/// How a command ended, with its (possibly truncated) output.
pub fn exec_result(r: &ExecResponse) -> Value {
    json!({
        "exit_code": r.exit_code,
        "signal": r.signal,
        "timed_out": r.timed_out,
        "duration_ms": r.duration_ms,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "stdout_truncated": r.stdout_truncated,
        "stderr_truncated": r.stderr_truncated,
    })
}

/// A process, as the CLI's `--json` shows it (the end without the output:
/// read_process_output has that).
pub fn process(p: &ProcessInfo) -> Value {
    crate::commands::processes::process_json(p)
}

pub fn file(f: &FileInfo) -> Value {
    json!({
        "name": f.name,
        "path": f.path,
        "size": f.size,
        "mode": format!("{:04o}", f.mode & 0o7777),
        "is_dir": f.is_dir,
        "is_symlink": f.is_symlink,
        "mtime_unix": f.mtime_unix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_and_exits_optional() {
        let f = FileInfo { name: "x".into(), mode: 0o100755, ..Default::default() };
        assert_eq!(file(&f)["mode"], "0755");
        let running = ProcessInfo { pid: 7, running: true, ..Default::default() };
        assert!(process(&running)["exit"].is_null());
        let done =
            ProcessInfo { exit: Some(ExecResponse { exit_code: 3, ..Default::default() }), ..Default::default() };
        assert_eq!(process(&done)["exit"]["exit_code"], 3);
    }
}
