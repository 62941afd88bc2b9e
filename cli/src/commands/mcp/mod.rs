//! `forkd mcp`: a Model Context Protocol server over the daemon's gRPC API.
//!
//! It speaks MCP on stdin/stdout (or streamable HTTP with `--http`) and
//! turns every tool call into calls to forkd-server, connected exactly as
//! every other command is (URL, token, TLS from the global options). The
//! tools live in one module per area; this one assembles them and serves.

mod files;
mod processes;
mod reply;
mod run;
mod sandboxes;
mod snapshots;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{CallToolRequestParams, CallToolResponse, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler, ServiceExt, tool_handler};

use crate::args::McpArgs;
use crate::client::Conn;
use crate::exit::CliError;

/// Where the HTTP transport answers.
pub const HTTP_PATH: &str = "/mcp";

const INSTRUCTIONS: &str = "\
forkd runs code in hardware-isolated microVMs (sandboxes) forked copy-on-write from \
snapshots of a warm VM. Typical flow: list_snapshots to find a ready snapshot (or \
create_snapshot with image \"python\"), spawn_sandboxes from its tag, then exec_command, \
eval_code (persistent Python interpreter), read_file/write_file/list_files, and \
start_process + read_process_output for long-running programs such as servers; \
kill_sandbox when done. branch_sandbox saves a running sandbox as a new snapshot that \
more sandboxes can be spawned from. Sandbox ids look like \"sb-\" followed by lowercase \
letters and digits; snapshot tags are names such as \"py\". Guest paths are absolute. \
Failed calls answer an error starting with a gRPC code such as NOT_FOUND or \
INVALID_ARGUMENT.";

/// The MCP server: a connection to the daemon and the tool table.
#[derive(Clone)]
pub struct ForkdMcp {
    conn: Arc<Conn>,
    tools: ToolRouter<Self>,
}

impl ForkdMcp {
    pub fn new(conn: Arc<Conn>) -> Self {
        Self { conn, tools: Self::tools() }
    }

    /// Every tool, from the routers of the area modules.
    pub fn tools() -> ToolRouter<Self> {
        let mut tools = Self::snapshot_tools()
            + Self::sandbox_tools()
            + Self::run_tools()
            + Self::process_tools()
            + Self::file_tools();
        for route in tools.map.values_mut() {
            let mut schema = serde_json::Value::Object((*route.attr.input_schema).clone());
            unwrap_descriptions(&mut schema);
            if let serde_json::Value::Object(schema) = schema {
                route.attr.input_schema = Arc::new(schema);
            }
        }
        tools
    }
}

/// Argument descriptions come from doc comments, wrapped at the source's
/// line width; a model reads them better as running text. Paragraph breaks
/// (blank lines) stay.
fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(s) if key == "description" => {
                        *s = s.split("\n\n").map(|p| p.replace('\n', " ")).collect::<Vec<_>>().join("\n\n");
                    }
                    other => unwrap_descriptions(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

#[tool_handler(router = self.tools)]
impl ServerHandler for ForkdMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("forkd", forkd_api::VERSION)
                    .with_title("forkd microVM sandboxes")
                    .with_description("Fork copy-on-write microVM sandboxes and run code in them"),
            )
            .with_instructions(INSTRUCTIONS)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, rmcp::ErrorData> {
        let name = request.name.clone();
        let response = self.tools.call(ToolCallContext::new(self, request, context)).await?;
        Ok(reply::reword_argument_error(&name, response))
    }
}

/// Runs the server until stdin closes (stdio) or the process is stopped
/// (HTTP).
pub async fn run(conn: Conn, args: McpArgs) -> anyhow::Result<u8> {
    let server = ForkdMcp::new(Arc::new(conn));
    match args.http {
        None => serve_stdio(server).await,
        Some(addr) => serve_http(server, addr, args.insecure_bind).await,
    }
}

async fn serve_stdio(server: ForkdMcp) -> anyhow::Result<u8> {
    // stdout carries the protocol: nothing else may be printed there.
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("MCP handshake on stdin/stdout failed: {e}"))?;
    running.waiting().await.map_err(|e| anyhow::anyhow!("MCP server stopped: {e}"))?;
    Ok(0)
}

async fn serve_http(server: ForkdMcp, addr: SocketAddr, insecure_bind: bool) -> anyhow::Result<u8> {
    if !addr.ip().is_loopback() && !insecure_bind {
        return Err(CliError::usage(format!(
            "--http {addr} is not a loopback address: whoever reaches it drives the daemon with this \
             client's token; add --insecure-bind if that is intended"
        ))
        .into());
    }
    let mut config = StreamableHttpServerConfig::default()
        // A request carrying an Origin header comes from a browser page:
        // refused, so no web page can drive the daemon through this port.
        .enforce_origin_validation();
    if !addr.ip().is_loopback() {
        // Clients name this host however they reach it.
        config = config.disable_allowed_hosts();
    }
    let service =
        StreamableHttpService::new(move || Ok(server.clone()), Arc::new(LocalSessionManager::default()), config);
    let router = axum::Router::new().nest_service(HTTP_PATH, service);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::usage(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    // stderr, like every diagnostic: a caller that passed port 0 learns the
    // port from this line.
    eprintln!("forkd mcp: listening on http://{local}{HTTP_PATH}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const TOOLS: [&str; 18] = [
        "list_snapshots",
        "create_snapshot",
        "spawn_sandboxes",
        "list_sandboxes",
        "get_sandbox",
        "kill_sandbox",
        "exec_command",
        "start_process",
        "list_processes",
        "read_process_output",
        "send_stdin",
        "kill_process",
        "eval_code",
        "read_file",
        "write_file",
        "list_files",
        "branch_sandbox",
        "wait_for_text",
    ];

    #[test]
    fn every_tool_is_listed_once() {
        let listed: Vec<String> = ForkdMcp::tools().list_all().into_iter().map(|t| t.name.to_string()).collect();
        let unique: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
        assert_eq!(unique.len(), listed.len(), "duplicate tool names: {listed:?}");
        assert_eq!(unique, TOOLS.into_iter().collect::<BTreeSet<_>>());
    }

    #[test]
    fn schemas_describe_every_argument() {
        for tool in ForkdMcp::tools().list_all() {
            let name = tool.name.to_string();
            let description = tool.description.as_deref().unwrap_or_default();
            assert!(description.len() > 40, "{name}: description too short: {description:?}");
            let schema = serde_json::Value::Object((*tool.input_schema).clone());
            assert_eq!(schema["type"], "object", "{name}: {schema}");
            // Unknown arguments are refused, not silently ignored.
            assert_eq!(schema["additionalProperties"], false, "{name}: {schema}");
            let properties = schema["properties"].as_object().unwrap_or_else(|| panic!("{name}: no properties"));
            for (arg, prop) in properties {
                let text = prop.to_string();
                assert!(text.contains("\"description\""), "{name}.{arg} has no description: {prop}");
            }
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            for r in &required {
                assert!(properties.contains_key(*r), "{name}: required {r} is not a property");
            }
            // Tools about one sandbox name it the same way.
            if properties.contains_key("sandbox_id") {
                assert!(required.contains(&"sandbox_id"), "{name}: sandbox_id must be required");
            }
        }
    }

    /// Every `description` string in a schema.
    fn descriptions<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| match v {
                serde_json::Value::String(s) if k == "description" => out.push(s),
                v => descriptions(v, out),
            }),
            serde_json::Value::Array(items) => items.iter().for_each(|v| descriptions(v, out)),
            _ => {}
        }
    }

    #[test]
    fn schemas_are_self_contained_running_text() {
        for tool in ForkdMcp::tools().list_all() {
            let schema = serde_json::Value::Object((*tool.input_schema).clone());
            // Some clients do not follow references: every type is inline.
            assert!(!schema.to_string().contains("$ref"), "{}: {schema}", tool.name);
            // No description keeps its source's line breaks (none here has
            // paragraphs).
            let mut found = Vec::new();
            descriptions(&schema, &mut found);
            assert!(!found.is_empty(), "{}", tool.name);
            for d in found {
                assert!(!d.contains('\n'), "{}: {d:?}", tool.name);
            }
        }
        let mut v = serde_json::json!({"description": "a\nb\n\nc", "x": [{"description": "d\ne"}]});
        unwrap_descriptions(&mut v);
        assert_eq!(v, serde_json::json!({"description": "a b\n\nc", "x": [{"description": "d e"}]}));
    }

    #[test]
    fn defaults_are_in_the_schemas() {
        let tools = ForkdMcp::tools();
        let schema = |name: &str| serde_json::Value::Object((*tools.get(name).unwrap().input_schema).clone());
        assert_eq!(schema("read_process_output")["properties"]["wait_ms"]["default"], 1000);
        assert_eq!(schema("kill_process")["properties"]["signal"]["default"], "KILL");
        assert_eq!(schema("spawn_sandboxes")["properties"]["n"]["default"], 1);
        assert_eq!(schema("wait_for_text")["properties"]["timeout_secs"]["default"], 60);
        let required = schema("exec_command")["required"].clone();
        assert_eq!(required, serde_json::json!(["sandbox_id"]));
    }
}
