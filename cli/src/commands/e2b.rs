//! `forkd e2b env`: the environment that points E2B's SDKs at the daemon.

use serde_json::json;

use crate::args::{E2bCommand, GlobalArgs};
use crate::client::{load_token, normalise_url};
use crate::exit::CliError;
use crate::output::emit_json;

pub fn run(global: &GlobalArgs, cmd: E2bCommand, json: bool) -> anyhow::Result<u8> {
    match cmd {
        E2bCommand::Env => env(global, json),
    }
}

/// Quotes a value for POSIX shells.
fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

fn env(global: &GlobalArgs, json: bool) -> anyhow::Result<u8> {
    let url = normalise_url(&global.url)?;
    let token = load_token(global.token.as_deref(), global.token_file.as_deref(), &url)?.ok_or_else(|| {
        CliError::usage(
            "no token: pass --token or --token-file (E2B's SDKs refuse to run without E2B_API_KEY; \
             a daemon under --no-auth takes any value)",
        )
    })?;
    let vars = [("E2B_API_URL", format!("{url}/e2b")), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", token)];
    if json {
        let obj: serde_json::Map<String, serde_json::Value> =
            vars.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        emit_json(&serde_json::Value::Object(obj))?;
    } else {
        for (k, v) in &vars {
            println!("export {k}={}", shell_quote(v));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shell_safe() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
