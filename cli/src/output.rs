//! Rendering for people and scripts: borderless aligned tables, key/value
//! listings, human-readable sizes and times, and JSON printing.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::{ContentArrangement, Table, presets};

/// Placeholder for an empty cell, so columns never collapse and `awk` field
/// numbers stay stable.
pub const NONE: &str = "-";

/// An aligned table without borders: a header line, then one line per row,
/// columns separated by at least two spaces, no trailing whitespace.
pub fn table<R, C>(headers: &[&str], rows: R) -> String
where
    R: IntoIterator<Item = Vec<C>>,
    C: Into<String>,
{
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .force_no_tty()
        .set_header(headers.iter().copied());
    for row in rows {
        table.add_row(row.into_iter().map(|c| {
            let c: String = c.into();
            if c.is_empty() { NONE.to_string() } else { c }
        }));
    }
    let last = headers.len().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
    }
    let mut out = table.trim_fmt();
    out.push('\n');
    out
}

/// `key  value` lines with the values aligned. Empty values show as "-".
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let value = if value.is_empty() { NONE } else { value };
        out.push_str(&format!("{key:<width$}  {value}\n"));
    }
    out
}

/// Bytes in binary units: `0 B`, `512 B`, `1.5 KiB`, `256.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A memory size given in MiB, `-` for 0 (no limit / unknown).
pub fn mib(mib: u32) -> String {
    if mib == 0 {
        NONE.to_string()
    } else if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// How long ago a unix time was, coarsely: `12s ago`, `5m ago`, `3h ago`,
/// `2d ago`; past a month the date, which reads better than a day count.
/// `-` for 0 (unset).
pub fn age(unix: i64, now: i64) -> String {
    if unix <= 0 {
        return NONE.to_string();
    }
    let secs = now.saturating_sub(unix).max(0);
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s if s < 30 * 86_400 => format!("{}d ago", s / 86_400),
        _ => {
            let at = UNIX_EPOCH + Duration::from_secs(unix as u64);
            humantime::format_rfc3339_seconds(at).to_string()[..10].to_string()
        }
    }
}

/// A unix time as RFC 3339 UTC with its age: `2024-05-01T12:00:00Z (3h ago)`.
pub fn timestamp(unix: i64, now: i64) -> String {
    if unix <= 0 {
        return NONE.to_string();
    }
    let at = UNIX_EPOCH + Duration::from_secs(unix as u64);
    format!("{} ({})", humantime::format_rfc3339_seconds(at), age(unix, now))
}

/// Seconds as a short duration (`90` → `1m 30s`); `-` for 0.
pub fn secs(secs: u32) -> String {
    if secs == 0 {
        NONE.to_string()
    } else {
        humantime::format_duration(Duration::from_secs(u64::from(secs))).to_string()
    }
}

/// Milliseconds with sensible precision: `0.42 ms`, `12.3 ms`, `1534 ms`.
pub fn millis(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// `a, b, c`; `-` when empty.
pub fn list(items: &[String]) -> String {
    if items.is_empty() { NONE.to_string() } else { items.join(", ") }
}

/// `k=v, k2=v2` sorted by key; `-` when empty.
pub fn labels(map: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = map.iter().collect();
    pairs.sort();
    let items: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    list(&items)
}

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Writes to stdout. A closed pipe (`forkd ls | head -1`) ends the process
/// quietly with success instead of failing the command.
pub fn emit(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other,
    }
}

/// Pretty JSON on stdout with a trailing newline.
pub fn emit_json(value: &serde_json::Value) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    emit(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(256 * 1024 * 1024), "256.0 MiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(mib(0), "-");
        assert_eq!(mib(256), "256 MiB");
        assert_eq!(mib(2048), "2 GiB");
    }

    #[test]
    fn times() {
        assert_eq!(age(0, 100), "-");
        assert_eq!(age(100, 100), "0s ago");
        assert_eq!(age(100, 159), "59s ago");
        assert_eq!(age(100, 220), "2m ago");
        assert_eq!(age(1, 7201), "2h ago");
        assert_eq!(age(1, 3 * 86_400 + 1), "3d ago");
        assert_eq!(age(1_700_000_000, 1_800_000_000), "2023-11-14");
        // Clock skew between host and client never shows a negative age.
        assert_eq!(age(200, 100), "0s ago");
        assert_eq!(timestamp(1_700_000_000, 1_700_000_060), "2023-11-14T22:13:20Z (1m ago)");
        assert_eq!(secs(0), "-");
        assert_eq!(secs(90), "1m 30s");
        assert_eq!(millis(0.4213), "0.42 ms");
        assert_eq!(millis(12.34), "12.3 ms");
        assert_eq!(millis(1534.4), "1534 ms");
    }

    #[test]
    fn tables_are_aligned_without_borders() {
        let out = table(&["ID", "STATUS", "PID"], vec![vec!["sb-a", "running", "12"], vec!["sb-longer", "", "7"]]);
        assert_eq!(
            out,
            "ID         STATUS   PID\n\
             sb-a       running  12\n\
             sb-longer  -        7\n"
        );
        assert_eq!(table::<Vec<Vec<String>>, String>(&["A", "B"], vec![]), "A  B\n");
    }

    #[test]
    fn key_value_listing() {
        let out = key_values(&[("tag", "py".into()), ("parent_tag", String::new())]);
        assert_eq!(out, "tag         py\nparent_tag  -\n");
    }

    #[test]
    fn label_listing_is_sorted() {
        let map = [("b", "2"), ("a", "1")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(labels(&map), "a=1, b=2");
        assert_eq!(labels(&Default::default()), "-");
    }
}
