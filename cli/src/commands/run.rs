//! `forkd run`: one command in a fresh child of an image, as `docker run
//! --rm` does it, in phases:
//!
//! - image: found in the store, imported from a local path or pulled
//!   ([`super::images::obtain`]);
//! - build: with --apt/--pip, a derived image (the daemon caches builds by
//!   their inputs, so a second run answers at once);
//! - bake: a snapshot of the image, cached under a tag derived from the
//!   image and the settings (`run-<12 hex>`) and marked with a label that
//!   says so; reused while it is ready, baked again when it failed;
//! - fork: one child;
//! - exec: the `exec -i` session of [`super::interactive`], on a terminal
//!   (`-t`) when stdin and stdout both are one;
//! - kill: the child goes afterwards, whatever the exec ended with, unless
//!   --keep.
//!
//! Until the exec starts, INT, TERM and HUP stop the run (exit 128+N); a
//! fork under way when they come is abandoned, and the daemon kills a child
//! nobody received. During the exec the session passes them on to the
//! command; if it has not ended [`SIGNAL_GRACE`] later (it ignores the
//! signal, or the signal came before the session was listening), or at a
//! second signal, forkd stops waiting, kills the child and exits 128+N.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use forkd_api::names::SandboxId;
use forkd_api::v1::{
    CreateSandboxesRequest, CreateSnapshotRequest, DeleteSandboxesRequest, DeleteSnapshotRequest, GetSnapshotRequest,
    Image, Snapshot,
};
use futures::FutureExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::images::{self, ImportOpts};
use crate::args::{BuildSteps, ExecArgs, RunArgs};
use crate::client::Conn;
use crate::exit::{CONFLICT, CliError, FAILURE, NOT_FOUND};
use crate::output::{millis, table};

/// How long the command has to end after a signal was passed on to it.
const SIGNAL_GRACE: Duration = Duration::from_secs(3);

/// Label of a snapshot `run` baked: the cache key it was baked for.
pub(super) const RUN_LABEL: &str = "forkd.run";

/// What a run snapshot is cached by: the image and the VM's settings (0 =
/// the daemon's default). A built-in image has no digest; its name and
/// size stand in.
fn cache_key(image: &Image, mem_mib: u32, vcpus: u32) -> String {
    let image = if image.digest.is_empty() {
        format!("builtin:{}:{}", images::snapshot_ref(image), image.size_bytes)
    } else {
        image.digest.clone()
    };
    format!("{image} mem_mib={mem_mib} vcpus={vcpus}")
}

/// `run-` and the first 12 hex digits of the key's sha256.
fn cache_tag(key: &str) -> String {
    format!("run-{}", &hex::encode(Sha256::digest(key.as_bytes()))[..12])
}

/// How long each phase took, for --timings.
#[derive(Default)]
struct Timings {
    phases: Vec<(&'static str, Option<Duration>, String)>,
}

impl Timings {
    fn add(&mut self, phase: &'static str, took: Option<Duration>, detail: impl Into<String>) {
        self.phases.push((phase, took, detail.into()));
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    fn render(&self, total: Duration) -> String {
        let mut rows: Vec<Vec<String>> = self
            .phases
            .iter()
            .map(|(phase, took, detail)| {
                vec![phase.to_string(), took.map(|d| millis(Self::ms(d))).unwrap_or_default(), detail.clone()]
            })
            .collect();
        rows.push(vec!["total".into(), millis(Self::ms(total)), String::new()]);
        table(&["PHASE", "TIME", "DETAIL"], rows)
    }

    fn json(&self, total: Duration) -> serde_json::Value {
        let phases: Vec<_> = self
            .phases
            .iter()
            .map(|(phase, took, detail)| json!({ "phase": phase, "ms": took.map(Self::ms), "detail": detail }))
            .collect();
        json!({ "phases": phases, "total_ms": Self::ms(total) })
    }
}

/// INT, TERM and HUP, caught from the start so that none ends forkd
/// before it has killed the child.
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }

    /// A signal that came and was not acted on yet.
    fn pending(&mut self) -> Option<i32> {
        self.recv().now_or_never()
    }

    /// `fut` (the exec, which passes signals on), unless a signal comes and
    /// it has not ended [`SIGNAL_GRACE`] later, or a second signal comes.
    async fn grace<T>(&mut self, fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        tokio::pin!(fut);
        let mut first: Option<(tokio::time::Instant, i32)> = None;
        loop {
            let until = first;
            let give_up = async move {
                match until {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut fut => return r,
                sig = self.recv() => match first {
                    Some(_) => return Err(interrupted(sig).into()),
                    None => first = Some((tokio::time::Instant::now() + SIGNAL_GRACE, sig)),
                },
                () = give_up => return Err(interrupted(first.map_or(libc::SIGINT, |(_, s)| s)).into()),
            }
        }
    }

    /// `fut`, unless a signal comes first.
    async fn guard<T>(&mut self, fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        tokio::select! {
            r = fut => r,
            sig = self.recv() => Err(interrupted(sig).into()),
        }
    }
}

fn interrupted(sig: i32) -> CliError {
    let name = nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("a signal");
    CliError::new(u8::try_from(128 + sig).unwrap_or(FAILURE), format!("interrupted by {name}"))
}

pub async fn run(conn: &Conn, args: RunArgs, as_json: bool) -> anyhow::Result<u8> {
    let started = Instant::now();
    let mut signals = Interrupts::new()?;
    let mut timings = Timings::default();
    let result = phases(conn, &args, &mut signals, &mut timings).await;
    if args.timings {
        let total = started.elapsed();
        if as_json {
            eprintln!("{}", timings.json(total));
        } else {
            eprint!("{}", timings.render(total));
        }
    }
    result
}

async fn phases(conn: &Conn, args: &RunArgs, signals: &mut Interrupts, t: &mut Timings) -> anyhow::Result<u8> {
    if let Some(tap) = &args.tap {
        eprintln!("forkd: --tap {tap} ignored: each sandbox gets a network of its own (forkd fork --network nat)");
    }
    if let Some(dir) = &args.cache {
        eprintln!("forkd: --cache {} ignored: images and snapshots are cached by the daemon", dir.display());
    }
    // A relative kernel path means the caller's; the daemon only takes its
    // own kernel, which it recognises by path.
    let kernel = args.kernel.as_ref().map(|k| std::fs::canonicalize(k).unwrap_or_else(|_| k.clone()));
    let at = Instant::now();
    let (image, found) = signals.guard(images::obtain(conn, &args.image, &ImportOpts::default())).await?;
    t.add("image", Some(at.elapsed()), format!("{}, {}", images::describe(&image, &args.image), found.as_str()));

    let steps = BuildSteps { apt: args.apt.clone(), pip: args.pip.clone(), run: Vec::new() };
    let image = if steps.is_empty() {
        t.add("build", None, "");
        image
    } else {
        let at = Instant::now();
        let from = images::snapshot_ref(&image);
        // Named as `parent build` names the same build.
        let name = images::build_name("parent", &from, &steps);
        let built = signals.guard(images::build(conn, &name, &from, &steps)).await?;
        t.add("build", Some(at.elapsed()), images::describe(&built, &name));
        built
    };

    let at = Instant::now();
    let (mem_mib, vcpus) = (args.mem_mib.unwrap_or(0), args.vcpus.unwrap_or(0));
    let mut key = cache_key(&image, mem_mib, vcpus);
    if let Some(k) = &kernel {
        // Baked with the kernel named, so the daemon has checked it is its own.
        key.push_str(&format!(" kernel={}", k.display()));
    }
    let tag = args.tag.as_ref().map_or_else(|| cache_tag(&key), ToString::to_string);
    let vm = BakeVm { mem_mib, vcpus, kernel: kernel.as_deref() };
    let (snap, reused) = signals.guard(bake(conn, &tag, &key, &image, vm)).await?;
    t.add("bake", Some(at.elapsed()), format!("{} {}", snap.tag, if reused { "reused" } else { "baked" }));

    let at = Instant::now();
    let req = CreateSandboxesRequest { snapshot_tag: snap.tag.clone(), n: Some(1), ..Default::default() };
    let forked = signals.guard(async { Ok(conn.call(conn.sandboxes().create_sandboxes(req)).await?) }).await?;
    let Some(id) = forked.sandboxes.into_iter().next().map(|s| s.id) else {
        return Err(CliError::new(FAILURE, format!("the daemon forked no sandbox from {}", snap.tag)).into());
    };
    t.add("fork", Some(at.elapsed()), id.clone());

    // From here on the child is killed on every way out.
    let at = Instant::now();
    let outcome = match signals.pending() {
        Some(sig) => Err(interrupted(sig).into()),
        None => signals.grace(exec(conn, &id, args)).await,
    };
    let detail = match &outcome {
        Ok(code) => format!("exit {code}"),
        Err(e) => format!("failed: {e}"),
    };
    t.add("exec", Some(at.elapsed()), detail);

    if args.keep {
        eprintln!("forkd: kept sandbox {id}");
        t.add("kill", None, "kept");
    } else {
        let at = Instant::now();
        let req = DeleteSandboxesRequest { ids: vec![id.clone()], ..Default::default() };
        match conn.call(conn.sandboxes().delete_sandboxes(req)).await {
            Ok(_) => t.add("kill", Some(at.elapsed()), ""),
            Err(e) => {
                eprintln!("forkd: could not kill sandbox {id}: {e} (`forkd kill {id}`)");
                t.add("kill", Some(at.elapsed()), format!("failed: {e}"));
            }
        }
    }
    outcome
}

/// The command in the child, with our stdin, stdout and stderr.
async fn exec(conn: &Conn, id: &str, args: &RunArgs) -> anyhow::Result<u8> {
    let id = SandboxId::parse(id).map_err(|e| CliError::new(FAILURE, format!("the daemon forked {e}")))?;
    let exec = ExecArgs {
        id,
        timeout: None,
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        stdin: true,
        tty: std::io::stdin().is_terminal() && std::io::stdout().is_terminal(),
        detach: false,
        tag: None,
        command: args.command.clone(),
    };
    super::interactive::run(conn, exec).await
}

/// Refuses a snapshot under the run's tag that was not baked for `key`.
fn check_ours(snap: &Snapshot, key: &str) -> Result<(), CliError> {
    match snap.labels.get(RUN_LABEL) {
        Some(k) if k == key => Ok(()),
        found => Err(CliError::new(
            CONFLICT,
            format!(
                "snapshot {} exists but was not baked by `forkd run` for this image and settings ({}); \
                 give another --tag, or delete it with `forkd rmi {}`",
                snap.tag,
                match found {
                    Some(k) => format!("its {RUN_LABEL} label is {k:?}, this run's would be {key:?}"),
                    None => format!("it has no {RUN_LABEL} label"),
                },
                snap.tag
            ),
        )),
    }
}

/// The VM a run snapshot is baked with.
struct BakeVm<'a> {
    mem_mib: u32,
    vcpus: u32,
    kernel: Option<&'a std::path::Path>,
}

/// The ready snapshot `tag` for `key`, and whether it was there already:
/// reused when ready, waited for while another run bakes it, baked (again,
/// when it failed) otherwise.
async fn bake(conn: &Conn, tag: &str, key: &str, image: &Image, vm: BakeVm<'_>) -> anyhow::Result<(Snapshot, bool)> {
    let label = format!("snapshot {tag}");
    let mut last_conflict = None;
    // A second round finds the snapshot another run created meanwhile.
    for _ in 0..2 {
        match conn.call(conn.snapshots().get_snapshot(GetSnapshotRequest { tag: tag.into() })).await {
            Ok(snap) => {
                check_ours(&snap, key)?;
                match snap.status.as_str() {
                    "ready" => return Ok((snap, true)),
                    "failed" => {
                        eprintln!("forkd: snapshot {tag} failed ({}); baking it again", snap.status_reason);
                        let req = DeleteSnapshotRequest { tag: tag.into(), cascade: false, force: false };
                        conn.call(conn.snapshots().delete_snapshot(req)).await?;
                    }
                    "deleting" => {
                        return Err(CliError::new(
                            CONFLICT,
                            format!("snapshot {tag} is being deleted; run again when it is gone"),
                        )
                        .into());
                    }
                    _ => {
                        let snap = super::snapshots::settle(conn, snap, &label).await?;
                        super::snapshots::report(&snap, false)?;
                        return Ok((snap, false));
                    }
                }
            }
            Err(e) if e.code == NOT_FOUND => {}
            Err(e) => return Err(e.into()),
        }
        let req = CreateSnapshotRequest {
            tag: tag.into(),
            image: images::snapshot_ref(image),
            vcpus: vm.vcpus,
            mem_mib: vm.mem_mib,
            kernel: vm.kernel.map(|k| k.display().to_string()).unwrap_or_default(),
            labels: [(RUN_LABEL.to_string(), key.to_string())].into(),
            wait: Some(false),
            ..Default::default()
        };
        match conn.call(conn.snapshots().create_snapshot(req)).await {
            Ok(snap) => {
                let snap = super::snapshots::settle(conn, snap, &label).await?;
                super::snapshots::report(&snap, false)?;
                return Ok((snap, false));
            }
            Err(e) if e.code == CONFLICT => last_conflict = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_conflict.unwrap_or_else(|| CliError::new(CONFLICT, format!("snapshot {tag} keeps changing"))).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_tags_follow_image_and_settings() {
        let image = Image { digest: format!("sha256:{}", "a".repeat(64)), ..Default::default() };
        let key = cache_key(&image, 0, 0);
        assert_eq!(key, format!("sha256:{} mem_mib=0 vcpus=0", "a".repeat(64)));
        let tag = cache_tag(&key);
        assert!(tag.starts_with("run-") && tag.len() == 16, "{tag}");
        assert!(forkd_api::names::Tag::parse(&tag).is_ok());
        assert_eq!(tag, cache_tag(&cache_key(&image, 0, 0)), "deterministic");
        assert_ne!(tag, cache_tag(&cache_key(&image, 512, 0)));
        assert_ne!(tag, cache_tag(&cache_key(&image, 0, 2)));
        let builtin = Image { names: vec!["python".into()], size_bytes: 7, ..Default::default() };
        assert_eq!(cache_key(&builtin, 0, 1), "builtin:python:7 mem_mib=0 vcpus=1");
    }

    #[test]
    fn only_snapshots_baked_for_the_key_are_reused() {
        let mut snap = Snapshot { tag: "run-x".into(), ..Default::default() };
        let e = check_ours(&snap, "k").unwrap_err();
        assert_eq!(e.code, CONFLICT);
        assert!(e.message.contains("no forkd.run label"), "{}", e.message);
        snap.labels.insert(RUN_LABEL.into(), "other".into());
        assert!(check_ours(&snap, "k").unwrap_err().message.contains("\"other\""));
        snap.labels.insert(RUN_LABEL.into(), "k".into());
        check_ours(&snap, "k").unwrap();
    }

    #[test]
    fn timings_render_every_phase() {
        let mut t = Timings::default();
        t.add("image", Some(Duration::from_micros(2100)), "python");
        t.add("build", None, "");
        let text = t.render(Duration::from_millis(400));
        assert_eq!(text, "PHASE  TIME    DETAIL\nimage  2.1 ms  python\nbuild  -       -\ntotal  400 ms  -\n");
        let v = t.json(Duration::from_millis(400));
        assert_eq!(v["phases"][1]["ms"], serde_json::Value::Null);
        assert_eq!(v["total_ms"], 400.0);
    }

    #[tokio::test]
    async fn a_signal_leaves_the_exec_a_grace_then_stops_it() {
        let mut signals = Interrupts::new().unwrap();
        let ends_in_time = async {
            // SAFETY: raise() signals this process, whose handler tokio installed.
            unsafe { libc::raise(libc::SIGHUP) };
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(7)
        };
        assert_eq!(signals.grace(ends_in_time).await.unwrap(), 7, "the command ended within the grace");
        let started = Instant::now();
        let never = async {
            // SAFETY: as above.
            unsafe { libc::raise(libc::SIGHUP) };
            std::future::pending::<anyhow::Result<u8>>().await
        };
        let e = signals.grace(never).await.unwrap_err();
        assert_eq!(crate::exit::code_for_error(&e), 129);
        assert!(started.elapsed() >= SIGNAL_GRACE);
    }

    #[test]
    fn interruptions_exit_128_plus_the_signal() {
        assert_eq!(interrupted(libc::SIGINT).code, 130);
        assert_eq!(interrupted(libc::SIGTERM).message, "interrupted by SIGTERM");
    }
}
