//! One module per area of the API; `run` picks the command.

mod bench;
mod bench_plot;
mod cleanup;
mod doctor;
mod e2b;
mod exec;
mod http_archive;
mod images;
mod interactive;
mod mcp;
mod metrics;
mod ports;
mod processes;
mod quickstart;
mod remote;
mod run;
mod sandboxes;
mod snapshots;
mod system;
mod transfer;
mod volume;
mod workspaces;
mod wp_bench;

use clap::CommandFactory;

use crate::args::{Cli, Command};
use crate::client::Conn;

/// Runs a parsed command line and returns the process exit status.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let Cli { global, command } = cli;
    let json = global.json;
    match command {
        Command::Completions(a) => {
            // Needs no daemon: completions are installed before one runs.
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "forkd", &mut std::io::stdout());
            Ok(0)
        }
        Command::Version => system::version(&global).await,
        // Both work without a daemon (and check it themselves).
        Command::Doctor(a) => doctor::run(&global, a).await,
        Command::Cleanup(a) => cleanup::run(&global, a).await,
        // Starts the daemon itself when it is not running.
        Command::Quickstart(a) => quickstart::run(&global, a).await,
        Command::VolumeCreate(a) => volume::create(a),
        // A host probe: needs no daemon.
        Command::WpBench(a) => wp_bench::run(a, json),
        // Only prints settings: needs no connection.
        Command::E2b(c) => e2b::run(&global, c, json),
        command => {
            let conn = Conn::connect(&global).await?;
            match command {
                Command::Where(a) => system::where_(&conn, a.all, json).await,
                Command::Images(a) => snapshots::images(&conn, a, json).await,
                Command::Snapshot(a) => snapshots::snapshot(&conn, a, json).await,
                Command::SnapshotInfo(a) => snapshots::info(&conn, a, json).await,
                Command::Rmi(a) => snapshots::rmi(&conn, a, json).await,
                Command::Compact(a) => snapshots::compact(&conn, a, json).await,
                Command::Share(a) => snapshots::share(&conn, a, json).await,
                Command::Pack(a) => transfer::pack(&conn, a, json).await,
                Command::Unpack(a) => transfer::unpack(&conn, a, json).await,
                Command::Push(a) => remote::push(&conn, a, json).await,
                Command::Pull(a) => remote::pull(&conn, a, json).await,
                Command::Remote(c) => remote::run(&conn, c, json).await,
                Command::Pool(c) => snapshots::pools(&conn, c, json).await,
                Command::SnapshotDiff(a) => snapshots::derive(&conn, a, json).await,
                Command::Fork(a) => sandboxes::fork(&conn, a, json).await,
                Command::Ls(a) => sandboxes::ls(&conn, a, json).await,
                Command::Kill(a) => sandboxes::kill(&conn, a, json).await,
                Command::Eval(a) => sandboxes::eval(&conn, a, json).await,
                Command::Ping(a) => sandboxes::ping(&conn, a, json).await,
                Command::PortForward(a) => ports::port_forward(&conn, a).await,
                Command::Url(a) => ports::url(&conn, a, json).await,
                Command::Metrics(a) => metrics::metrics(&conn, a, json).await,
                Command::Top(a) => metrics::top(&conn, a, json).await,
                Command::Exec(a) => exec::exec(&conn, a, json).await,
                Command::Ps(a) => processes::ps(&conn, a, json).await,
                Command::Attach(a) => processes::attach(&conn, a).await,
                Command::Signal(a) => processes::signal_process(&conn, a, json).await,
                Command::Watch(a) => processes::watch(&conn, a, json).await,
                Command::Workspace(c) => workspaces::run(&conn, c, json).await,
                Command::Bench(a) => bench::run(&conn, a, json).await,
                Command::Mcp(a) => mcp::run(conn, a).await,
                Command::Image(c) => images::run(&conn, c, json).await,
                Command::Parent(c) => images::parent(&conn, c, json).await,
                Command::FromImage(a) => images::from_image(&conn, a, json).await,
                Command::Run(a) => run::run(&conn, a, json).await,
                Command::Completions(_)
                | Command::Version
                | Command::VolumeCreate(_)
                | Command::E2b(_)
                | Command::Doctor(_)
                | Command::Quickstart(_)
                | Command::WpBench(_)
                | Command::Cleanup(_) => unreachable!("handled above"),
            }
        }
    }
}

/// Follows page tokens until the listing is complete. A token that repeats
/// would loop forever, so it ends the listing too.
async fn collect_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        let (items, next) = fetch(token).await?;
        all.extend(items);
        if next.is_empty() || !seen.insert(next.clone()) {
            return Ok(all);
        }
        token = next;
    }
}
