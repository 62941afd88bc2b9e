//! `version` and `where`: facts about the daemon from SystemService.

use forkd_api::v1::{GetVersionRequest, VersionInfo};
use serde_json::json;

use crate::args::GlobalArgs;
use crate::client::Conn;
use crate::json;
use crate::output::{emit, emit_json, key_values};

async fn get_version(conn: &Conn) -> anyhow::Result<VersionInfo> {
    Ok(conn.call(conn.system().get_version(GetVersionRequest {})).await?)
}

/// The client's version is printed before connecting, so it shows even when
/// the daemon is down (the command still fails with exit 6 then).
pub async fn version(global: &GlobalArgs) -> anyhow::Result<u8> {
    if global.json {
        let conn = Conn::connect(global).await?;
        let server = get_version(&conn).await?;
        emit_json(&json!({
            "client": { "version": forkd_api::VERSION },
            "server": json::version_info(&server),
        }))?;
        return Ok(0);
    }
    // Padded to the width of the longest key below ("accel_reason").
    emit(&format!("{:<12}  {}\n", "client", forkd_api::VERSION))?;
    let conn = Conn::connect(global).await?;
    let v = get_version(&conn).await?;
    let server = if v.git_commit.is_empty() { v.version.clone() } else { format!("{} ({})", v.version, v.git_commit) };
    emit(&key_values(&[
        ("server", server),
        ("api", v.api),
        ("backend", v.backend),
        ("accel", v.accel),
        ("accel_reason", v.accel_reason),
    ]))?;
    Ok(0)
}

pub async fn where_(conn: &Conn, all: bool, as_json: bool) -> anyhow::Result<u8> {
    let v = get_version(conn).await?;
    if !all && !as_json {
        println!("{}", v.data_dir);
        return Ok(0);
    }
    if as_json {
        let mut value = json::version_info(&v);
        value["url"] = json!(conn.url);
        emit_json(&value)?;
        return Ok(0);
    }
    emit(&key_values(&[
        ("url", conn.url.clone()),
        ("version", v.version),
        ("backend", v.backend),
        ("accel", v.accel),
        ("data_dir", v.data_dir),
        ("sandboxes", v.sandboxes.to_string()),
        ("snapshots", v.snapshots.to_string()),
    ]))?;
    Ok(0)
}
