//! `forkd quickstart`: the main job end to end, as a person trying forkd
//! for the first time runs it: the host preflight, the steps still missing
//! (listed, then run once confirmed), a bake, a fork with its timing, each
//! child saying who it is, and what to try next.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use forkd_api::v1::{
    CreateSandboxesRequest, CreateSnapshotRequest, DeleteSandboxesRequest, ExecRequest, GetSnapshotRequest,
    GetVersionRequest,
};

use super::doctor::{self, Level};
use crate::args::{DoctorArgs, GlobalArgs, QuickstartArgs};
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, USAGE};
use crate::output::emit;

/// How long a daemon started here has to answer.
const DAEMON_START: Duration = Duration::from_secs(60);
/// What each child runs to show it is its own machine.
const SPEAK: &str = "import socket, uuid; print(socket.gethostname(), uuid.uuid4())";

/// A step the machine still needs.
enum Step {
    StartDaemon(PathBuf),
    Bake,
}

impl Step {
    fn describe(&self, a: &QuickstartArgs) -> String {
        match self {
            Step::StartDaemon(bin) => {
                format!("start the daemon: {} --data-dir {}", bin.display(), a.data_dir.display())
            }
            Step::Bake => format!("bake a warmed python snapshot: forkd snapshot --tag {} --image python", a.tag),
        }
    }
}

fn say(text: &str) -> anyhow::Result<()> {
    emit(&format!("==> {text}\n"))?;
    Ok(())
}

/// Asks before changing anything, unless --yes; without a terminal to ask
/// on, refuses (naming the steps) rather than guessing.
fn confirm(a: &QuickstartArgs, steps: &[Step]) -> anyhow::Result<()> {
    let list: String = steps.iter().map(|s| format!("  - {}\n", s.describe(a))).collect();
    emit(&format!("Missing:\n{list}"))?;
    if a.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(USAGE, "steps are missing and there is no terminal to ask on: pass --yes").into());
    }
    print!("Run them? [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(CliError::new(FAILURE, "nothing was changed").into())
    }
}

async fn daemon(global: &GlobalArgs) -> Option<Conn> {
    let conn = Conn::connect(global).await.ok()?;
    conn.call(conn.system().get_version(GetVersionRequest {})).await.ok()?;
    Some(conn)
}

fn start_daemon(bin: &PathBuf, a: &QuickstartArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data_dir)?;
    let log = a.data_dir.join("forkd-server.log");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let err = out.try_clone()?;
    std::process::Command::new(bin)
        .arg("--data-dir")
        .arg(&a.data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| CliError::new(FAILURE, format!("cannot start {}: {e}", bin.display())))?;
    emit(&format!("    log: {}\n", log.display()))?;
    Ok(())
}

pub async fn run(global: &GlobalArgs, a: QuickstartArgs) -> anyhow::Result<u8> {
    say("preflight (forkd doctor)")?;
    let host = DoctorArgs {
        data_dir: a.data_dir.clone(),
        guest_dir: None,
        no_daemon: true,
        vmm_uid_base: 2_000_000_000,
        vmm_uid_count: 65536,
    };
    let failed: Vec<_> = doctor::checks(global, &host).await.into_iter().filter(|c| c.level == Level::Fail).collect();
    if !failed.is_empty() {
        let list: String = failed.iter().map(|c| format!("  {}: {} ({})\n", c.name, c.detail, c.fix)).collect();
        emit(&format!(
            "The host cannot run forkd yet:\n{list}Fix these (scripts/setup-host.sh does most), then run again.\n"
        ))?;
        return Ok(FAILURE);
    }
    emit("    the host can run forkd\n")?;

    let mut conn = daemon(global).await;
    let mut steps = Vec::new();
    if conn.is_none() {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("forkd-server");
        if !bin.is_file() {
            return Err(CliError::new(
                FAILURE,
                format!("no daemon answers at {} and there is no {} to start", global.url, bin.display()),
            )
            .into());
        }
        steps.push(Step::StartDaemon(bin));
    }
    let have_snapshot = match &conn {
        Some(c) => c.call(c.snapshots().get_snapshot(GetSnapshotRequest { tag: a.tag.to_string() })).await.is_ok(),
        None => false,
    };
    if !have_snapshot {
        steps.push(Step::Bake);
    }
    if !steps.is_empty() {
        confirm(&a, &steps)?;
    }
    for step in &steps {
        say(&step.describe(&a))?;
        match step {
            Step::StartDaemon(bin) => {
                start_daemon(bin, &a)?;
                let until = Instant::now() + DAEMON_START;
                while conn.is_none() && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    conn = daemon(global).await;
                }
                if conn.is_none() {
                    return Err(
                        CliError::new(FAILURE, "the daemon did not answer within a minute (see its log)").into()
                    );
                }
            }
            Step::Bake => {
                let c = conn.as_ref().expect("the daemon answers by now");
                let t = Instant::now();
                let req = CreateSnapshotRequest {
                    tag: a.tag.to_string(),
                    image: "python".into(),
                    wait: Some(false),
                    ..Default::default()
                };
                let snap = c.call(c.snapshots().create_snapshot(req)).await?;
                let snap = super::snapshots::settle(c, snap, &format!("baking {}", a.tag)).await?;
                super::snapshots::report(&snap, false)?;
                emit(&format!("    baked in {:.1} s\n", t.elapsed().as_secs_f64()))?;
            }
        }
    }
    let conn = conn.expect("the daemon answers by now");

    say(&format!("forking {} children from {}", a.n, a.tag))?;
    let t = Instant::now();
    let req = CreateSandboxesRequest { snapshot_tag: a.tag.to_string(), n: Some(a.n), ..Default::default() };
    let kids = conn.call(conn.sandboxes().create_sandboxes(req)).await?.sandboxes;
    let fork_ms = t.elapsed().as_secs_f64() * 1000.0;
    emit(&format!(
        "    forked {} in {fork_ms:.0} ms ({:.1} ms each)\n",
        kids.len(),
        fork_ms / kids.len().max(1) as f64
    ))?;

    say("each child says who it is")?;
    let t = Instant::now();
    let mut spoke = 0;
    for k in &kids {
        let req = ExecRequest {
            id: k.id.clone(),
            args: vec!["python3".into(), "-c".into(), SPEAK.into()],
            timeout_secs: 30,
            ..Default::default()
        };
        match conn.call(conn.sandboxes().exec(req)).await {
            Ok(r) if r.exit_code == 0 => {
                spoke += 1;
                emit(&format!("    {}: {}", k.id, r.stdout))?;
            }
            Ok(r) => emit(&format!("    {}: exit {}: {}", k.id, r.exit_code, r.stderr))?,
            Err(e) => emit(&format!("    {}: {e}\n", k.id))?,
        }
    }
    emit(&format!("    {spoke}/{} answered in {:.0} ms\n", kids.len(), t.elapsed().as_secs_f64() * 1000.0))?;

    let ids: Vec<String> = kids.iter().map(|k| k.id.clone()).collect();
    if a.keep {
        emit(&format!("\nLeft running: {}\n", ids.join(" ")))?;
    } else {
        say("killing the children")?;
        let req = DeleteSandboxesRequest { ids: ids.clone(), ..Default::default() };
        conn.call(conn.sandboxes().delete_sandboxes(req)).await?;
    }
    emit(&format!(
        "\nNext:\n  forkd fork --tag {tag} -n 3\n  forkd ls\n  forkd exec -it <id> -- bash\n  \
         forkd snapshot --from-sandbox <id> --tag mine   (branch a running child)\n  forkd bench --tag {tag}\n",
        tag = a.tag
    ))?;
    Ok(if spoke == kids.len() { 0 } else { FAILURE })
}
