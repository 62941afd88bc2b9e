//! The command line: every command, flag and its help text.
//!
//! Names are checked here with the same validators the daemon uses, so a bad
//! tag or id is a usage error (exit 2) before anything is sent.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use forkd_api::names::{SandboxId, Tag, WorkspaceName};

use crate::exit::EXIT_CODES_HELP;

pub const DEFAULT_URL: &str = "http://127.0.0.1:8889";

const ABOUT: &str = "Run code in microVMs and fork copy-on-write children from snapshots";

const LONG_ABOUT: &str = "\
forkd is the command-line client of forkd-server. It boots an image once, \
snapshots the warm VM, and forks copy-on-write sandboxes from that snapshot \
in milliseconds.

Typical session:
  forkd snapshot --tag py --image python      # boot, warm and snapshot
  forkd fork --tag py -n 3                     # three sandboxes from it
  forkd exec sb-abc123 -- python3 -c 'print(1)'
  forkd eval sb-abc123 '2 + 2'
  forkd kill --tag py

Listing and get commands print aligned tables; add --json for \
machine-readable output with the API's field names.";

#[derive(Parser, Debug)]
#[command(
    name = "forkd",
    version = forkd_api::VERSION,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXIT_CODES_HELP,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Daemon address (http:// or https://).
    #[arg(
        long,
        alias = "daemon-url",
        env = "FORKD_URL", hide_env_values = true,
        default_value = DEFAULT_URL,
        global = true,
        value_name = "URL"
    )]
    pub url: String,

    /// Bearer token sent with every call. Wins over --token-file.
    #[arg(
        long,
        alias = "daemon-token",
        env = "FORKD_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// File holding the bearer token (surrounding whitespace is ignored;
    /// readable by its owner only). Without --token or this, a loopback URL
    /// uses the daemon's own /var/lib/forkd/token when it exists.
    #[arg(long, env = "FORKD_TOKEN_FILE", hide_env_values = true, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// PEM file of the CA that signed the daemon's certificate (https URLs).
    /// Without it the system's trusted roots are used.
    #[arg(long, env = "FORKD_CA_CERT", hide_env_values = true, global = true, value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up on any single call to the daemon after this long
    /// (e.g. 30, 30s, 2m). Goes before the command name. Default: no limit.
    #[arg(long = "timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub rpc_timeout: Option<std::time::Duration>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the client's and the daemon's versions.
    #[command(long_about = "Show the client's version and the daemon's version, API, \
        VMM backend and accelerator (with the reason it was chosen).")]
    Version,

    /// Print the daemon's data directory (with --all: what it holds).
    #[command(
        long_about = "Print the data directory of the daemon this client talks to, alone on one \
            line, so `$(forkd where)/snapshots/TAG` names a snapshot's directory. With --all: the \
            daemon URL in use, the server version, backend, accelerator, data directory, and how \
            many sandboxes and ready snapshots it has (--json gives all of it).",
        after_help = "Examples:\n  ls \"$(forkd where)/snapshots\"\n  forkd where --all"
    )]
    Where(WhereArgs),

    /// List snapshots.
    #[command(
        visible_alias = "snapshots",
        long_about = "List snapshots, oldest first, as a table: \
            TAG STATUS KIND PARENT IMAGE MEM SIZE CREATED. SIZE is the space the \
            snapshot's own files take on disk.",
        after_help = "Examples:\n  forkd images\n  forkd images --status ready --json"
    )]
    Images(ImagesArgs),

    /// Create a snapshot from an image, or branch a running sandbox.
    #[command(
        long_about = "Create a snapshot.\n\n\
            With --image, the daemon boots the image, waits until its runtime is warm \
            (optionally running --warm-eval code), pauses it and saves it under --tag. \
            The command shows progress until the snapshot is ready and exits non-zero \
            with the reason if it fails. --no-wait returns at once.\n\n\
            With --from-sandbox, the running sandbox is branched into a new snapshot \
            while it keeps running: --diff (default) saves only the pages written since \
            its parent, --full writes a flat copy.",
        after_help = "Examples:\n  \
            forkd snapshot --tag py --image python\n  \
            forkd snapshot --tag py-np --image python --mem-mib 512 --warm-eval 'import numpy'\n  \
            forkd snapshot --tag tiny --image /srv/images/tiny.ext4 --no-wait\n  \
            forkd snapshot --from-sandbox sb-abc123 --tag after-setup\n  \
            forkd snapshot --from-sandbox sb-abc123 --full"
    )]
    Snapshot(SnapshotArgs),

    /// Show everything about one snapshot.
    #[command(
        long_about = "Show one snapshot: status, kind, image, its chain (parent_tag, \
            ancestors, chain_depth), dependents, sizes, digests and more.",
        after_help = "Examples:\n  forkd snapshot-info py\n  forkd snapshot-info py --json"
    )]
    SnapshotInfo(TagArg),

    /// Delete snapshots.
    #[command(
        long_about = "Delete one or more snapshots. A snapshot that other snapshots \
            depend on is refused (exit 4) unless --cascade deletes them too, or --force \
            orphans them (they become \"failed\").",
        after_help = "Examples:\n  forkd rmi old-tag\n  forkd rmi base --cascade"
    )]
    Rmi(RmiArgs),

    /// Write a flat copy of a (diff) snapshot.
    #[command(
        long_about = "Write a flat, parentless copy of a snapshot under a new tag, so it \
            no longer depends on its chain.",
        after_help = "Example:\n  forkd compact py-step3 --to py-flat",
        alias = "snapshot-compact"
    )]
    Compact(CompactArgs),

    /// Share a snapshot with every tenant, or make it private again (admins).
    #[command(
        long_about = "Mark a snapshot shared: every tenant of the daemon (--tokens-file) may \
            see it and fork from it. --off makes it private to its owner (and admins) again; \
            sandboxes already forked from it keep running.",
        after_help = "Examples:\n  forkd share py\n  forkd share py --off"
    )]
    Share(ShareArgs),

    /// Write a snapshot (and its chain) to a .tar.zst archive.
    #[command(
        long_about = "Stream a snapshot from the daemon into a .tar.zst archive: the snapshot, the chain \
            of ancestors it is a layer over, and a manifest with every file's size and sha256. Memory \
            keeps only its non-zero pages. The file is written beside its name and renamed when \
            complete. Works against a remote daemon (--url).",
        after_help = "Examples:\n  forkd pack py -o py.tar.zst\n  forkd pack branch1 -o b.tar.zst --flat\n  \
            forkd pack branch1 -o layer.tar.zst --layer-only"
    )]
    Pack(PackArgs),

    /// Add the snapshots of a .tar.zst archive to the daemon.
    #[command(
        long_about = "Stream an archive made by `forkd pack` to the daemon, which checks every entry, size \
            and digest and that it has the same guest kernel, initramfs and image before anything \
            becomes visible. A tag that exists is refused unless --as gives another.",
        after_help = "Examples:\n  forkd unpack py.tar.zst\n  forkd unpack py.tar.zst --as py2"
    )]
    Unpack(UnpackArgs),

    /// Upload a snapshot (and its chain) to the daemon's remote object store.
    #[command(
        long_about = "Push a snapshot and the chain of ancestors it is a layer over to the object \
            store the daemon was started with (--remote on forkd-server). Blobs are named by their \
            sha256: only what the remote lacks is uploaded, so pushing a branch after its parent \
            sends just the branch's layer, and a second push sends nothing. Admins only.\n\n\
            With a URL instead, the snapshot is packed (as `forkd pack`) into a temporary file \
            and uploaded to that URL with one HTTP PUT, e.g. a presigned object-store URL.",
        after_help = "Examples:\n  forkd push py\n  forkd push py-branch --json\n  \
            forkd push --tag py 'https://bucket.example/py.tar.zst?X-Amz-Signature=...'"
    )]
    Push(PushArgs),

    /// Download a snapshot (and what this host lacks of its chain) from the remote.
    #[command(
        long_about = "Pull a snapshot from the daemon's remote object store. Ancestors this host \
            already has are kept; the rest is downloaded into staging, every size and digest is \
            checked, and only then do the snapshots appear. Forks of a tag that is not here pull \
            it by themselves when the daemon has a remote (see forkd fork --no-pull-missing).\n\n\
            With an http(s):// URL instead, the archive there (made by `forkd pack`) is \
            downloaded into a temporary file and unpacked as `forkd unpack` does; OWNER/NAME \
            is HUB/OWNER/NAME.forkd-snapshot.tar.zst with --hub.",
        after_help = "Examples:\n  forkd pull py-branch\n  forkd pull py --json\n  \
            forkd pull https://hub.example/py.forkd-snapshot.tar.zst --tag py2 --force"
    )]
    Pull(PullArgs),

    /// The daemon's remote object store.
    #[command(subcommand)]
    Remote(RemoteCommand),

    /// Hot pools: children kept ready for forks.
    #[command(subcommand)]
    Pool(PoolCommand),

    /// Derive a snapshot by running a command in a child of another.
    #[command(
        long_about = "Fork a transient sandbox from --from, run a command in it, save the \
            result as a diff snapshot --tag (parent --from) and kill the sandbox.\n\n\
            The command is given with --exec as one string, split like a shell would \
            (quotes work; pipes and redirections need --sh), or after --.",
        after_help = "Examples:\n  \
            forkd snapshot-diff --from py --tag py-req --exec 'pip install requests'\n  \
            forkd snapshot-diff --from py --tag py-data --sh --exec 'echo hi > /tmp/x'\n  \
            forkd snapshot-diff --from py --tag py-x -- touch /tmp/x"
    )]
    SnapshotDiff(SnapshotDiffArgs),

    /// Fork sandboxes from a snapshot.
    #[command(
        visible_alias = "spawn",
        long_about = "Fork N copy-on-write sandboxes from a ready snapshot. All or \
            nothing: if one fails, the others are killed. Prints a table of the new \
            sandboxes; --quiet prints only their ids, one per line.",
        after_help = "Examples:\n  \
            forkd fork --tag py\n  \
            forkd fork --tag py -n 10 --memory-limit-mib 512 --ttl 10m\n  \
            forkd fork --tag py --network nat --allow 10.0.0.0/8:443 --label team=ml\n  \
            ID=$(forkd fork --tag py --quiet)"
    )]
    Fork(ForkArgs),

    /// List sandboxes.
    #[command(
        long_about = "List live sandboxes as a table: \
            ID SNAPSHOT STATUS PID CREATED MEM_LIMIT.",
        after_help = "Examples:\n  forkd ls\n  forkd ls --tag py --json"
    )]
    Ls(LsArgs),

    /// Kill sandboxes.
    #[command(
        long_about = "Kill sandboxes by id, every child of a snapshot (--tag), or all \
            of them (--all). Killing a sandbox that is already gone succeeds.",
        after_help = "Examples:\n  forkd kill sb-abc123 sb-def456\n  forkd kill --tag py\n  forkd kill --all"
    )]
    Kill(KillArgs),

    /// Run a command in a sandbox, streaming its output.
    #[command(
        long_about = "Run a command in a sandbox. Its stdout and stderr are streamed to \
            this process's stdout and stderr as they are produced, and forkd exits with \
            the command's exit status (128+N when signal N ended it, 124 when it timed \
            out). Options for forkd go before the command; everything from the command \
            on is passed through untouched (use -- if the command starts with '-').\n\n\
            -i streams this process's stdin to the command as it is read; its end closes \
            the command's stdin. -t runs the command on a pseudo-terminal the size of this \
            terminal (24x80 without one), resized along with it, and passes $TERM on; \
            without -i the command reads end-of-file from it. Together, -it is an \
            interactive session: this terminal is put in raw mode, so every key goes to \
            the command (Ctrl-C interrupts it, Ctrl-D ends its input, Ctrl-Z suspends \
            it), and it is restored when forkd exits. -it needs \
            stdin to be a terminal and fails (exit 2) when it is not: use -i alone to \
            pipe input. With -i or -t there is no time limit unless --timeout is given, \
            and the command is a process of the sandbox: if forkd loses the connection \
            it keeps running (forkd ps, forkd attach). Signals sent to forkd are passed \
            on: INT and QUIT as they are; TERM and HUP end the session, and the command \
            gets HUP on a terminal, the same signal otherwise.\n\n\
            -d starts the command in the background and prints its pid and tag (--json: \
            the whole process record); follow it with forkd attach, stop it with forkd \
            signal. Its output is kept (the last 1 MiB) and its exit status remembered \
            for 10 minutes.",
        after_help = "Examples:\n  \
            forkd exec sb-abc123 -- ls -la /\n  \
            forkd exec sb-abc123 --env DEBUG=1 --cwd /tmp -- python3 script.py\n  \
            echo hello | forkd exec -i sb-abc123 -- cat\n  \
            forkd exec sb-abc123 --timeout 5 -- sleep 60; echo $?   # 124\n  \
            forkd exec -it sb-abc123 -- bash\n  \
            forkd exec -d --tag web sb-abc123 -- python3 -m http.server 8000"
    )]
    Exec(ExecArgs),

    /// List a sandbox's processes (started with exec -d, -i or -t).
    #[command(
        long_about = "List the processes of a sandbox started with `forkd exec -d`, -i or -t \
            (or their API calls), running and recently exited, as a table: \
            PID TAG STATUS STARTED OUTPUT COMMAND. OUTPUT counts every byte the process \
            wrote, including what is no longer kept.",
        after_help = "Examples:\n  forkd ps sb-abc123\n  forkd ps sb-abc123 --json"
    )]
    Ps(IdArg),

    /// Follow a process's output until it exits.
    #[command(
        long_about = "Print a process's output: what the daemon still keeps of it (the last \
            1 MiB), then what it writes from now on, until it exits; forkd then exits with \
            its status (128+N when signal N ended it). --no-replay starts at the current \
            end. Ctrl-C detaches (exit 130) and leaves the process running. The process \
            is named by its pid or its tag. Output only: nothing is sent to its stdin.",
        after_help = "Examples:\n  forkd attach sb-abc123 web\n  forkd attach sb-abc123 4242 --no-replay"
    )]
    Attach(AttachArgs),

    /// Send a signal to a process (and its process group).
    #[command(
        long_about = "Send a signal, by name (TERM, INT, KILL, SIGHUP, …) or number (1-64), \
            to a process's process group. The process is named by its pid or its tag.",
        after_help = "Examples:\n  forkd signal sb-abc123 web TERM\n  forkd signal sb-abc123 4242 9"
    )]
    Signal(SignalArgs),

    /// Print changes to files under a guest directory as they happen.
    #[command(
        long_about = "Watch a guest directory, and every directory below it unless \
            --no-recursive, and print one line per change until interrupted: its kind \
            (create, write, remove, rename, chmod) and path, with a trailing / for a \
            directory and (from OLD) for a rename. \"watching …\" on stderr says when \
            the watch is armed. --json prints NDJSON: one {kind, path, from, is_dir} \
            object per event, and {\"overflow\": true} where events were lost.",
        after_help = "Examples:\n  forkd watch sb-abc123 /root\n  forkd watch sb-abc123 /tmp --no-recursive --json"
    )]
    Watch(WatchArgs),

    /// Evaluate Python in a sandbox's warm interpreter.
    #[command(
        long_about = "Evaluate Python code in the sandbox's persistent interpreter \
            namespace. Anything the code printed is shown first, then the value of the \
            last expression. On an exception the traceback goes to stderr and forkd \
            exits 1. Pass - as the code to read it from stdin.",
        after_help = "Examples:\n  \
            forkd eval sb-abc123 '2 + 2'\n  \
            forkd eval sb-abc123 'import sys; sys.version'\n  \
            forkd eval sb-abc123 - < script.py"
    )]
    Eval(EvalArgs),

    /// Measure a round trip to a sandbox's guest agent.
    #[command(after_help = "Example:\n  forkd ping sb-abc123")]
    Ping(IdArg),

    /// Forward a local TCP port to a port inside a sandbox.
    #[command(
        name = "port-forward",
        long_about = "Listen on a local port and carry each connection to PORT on the \
            sandbox's loopback, over the daemon (the sandbox needs no network device). \
            LOCAL defaults to PORT; 0 picks a free one. The first line printed says where \
            it listens. Runs until interrupted. A connection to a port nobody listens on \
            in the sandbox is closed and reported on stderr.",
        after_help = "Examples:\n  forkd port-forward sb-abc123 8000\n  \
            forkd port-forward sb-abc123 18000:8000\n  forkd port-forward sb-abc123 0:5432 --address 0.0.0.0"
    )]
    PortForward(PortForwardArgs),

    /// Print the URL that reaches a port of a sandbox through the daemon.
    #[command(
        long_about = "Print the proxy URL of PORT in a sandbox: \
            {daemon}/v1/sandboxes/{id}/ports/{port}/, which needs the daemon's token like \
            every route. --share makes (or shows) a link that needs no token, \
            {daemon}/v1/shared/{token}/: anyone who has it reaches the port, so treat it \
            like a password. --unshare removes that link.",
        after_help = "Examples:\n  forkd url sb-abc123 8000\n  forkd url sb-abc123 8000 --share\n  \
            forkd url sb-abc123 8000 --unshare"
    )]
    Url(UrlArgs),

    /// Show one sandbox's resource use (CPU, memory, disk, network).
    #[command(
        long_about = "Sample a sandbox's resource use once: the CPU time and share of a core \
            its VMM used (over a quarter of a second), the VMM's resident and proportional \
            memory on the host, the guest's own memory use, the disk its work dir takes, \
            its NIC's bytes, the commands run in it and when it was last used.",
        after_help = "Examples:\n  forkd metrics sb-abc123\n  forkd metrics sb-abc123 --json"
    )]
    Metrics(IdArg),

    /// A live table of sandboxes' resource use.
    #[command(
        long_about = "Show every sandbox (or those named) with its CPU use, memory, disk, \
            network and commands, refreshed every --interval seconds until interrupted. \
            --once prints one table and exits; --json prints one JSON array per refresh.",
        after_help = "Examples:\n  forkd top\n  forkd top sb-abc123 --interval 5\n  forkd top --once --json"
    )]
    Top(TopArgs),

    /// Manage workspaces: named sandboxes that suspend and resume.
    #[command(
        subcommand,
        visible_alias = "ws",
        long_about = "Manage workspaces: long-lived named sandboxes. Suspend saves a \
            workspace's state into a snapshot and stops it; resume forks it back. \
            Settings survive suspend, resume and daemon restarts.",
        after_help = "Examples:\n  \
            forkd workspace create dev --tag py\n  \
            forkd workspace suspend dev\n  \
            forkd workspace resume dev\n  \
            forkd workspace list --json"
    )]
    Workspace(WorkspaceCommand),

    /// Measure spawn, exec, fan-out, cleanup and memory per child, next to
    /// bare VMM restores of the same snapshot (run on the daemon's host).
    #[command(
        long_about = "Measure forkd against bare VMM restores, in one run. Steps: spawn(1) \
            cold and from a hot pool, exec round trips (at rest and while a pool refills), \
            a fan-out of n children for each --fanout value (time until all answer), cold \
            and from a hot pool (pools hold at most 64), PSS per idle child and where it \
            goes, cleanup. Each cold fan-out alternates with bare QEMU restores of the same \
            snapshot files (no daemon, no identity re-init), --rounds times, and the \
            ratios are reported. --phases shows where a spawn's time goes, cold, pooled \
            and bare. Must run on the daemon's host, as root; it needs an admin token for \
            the refill row.",
        after_help = "Example:\n  forkd bench --tag py --fanout 10,30,100 --phases --plot bench.png"
    )]
    Bench(BenchArgs),

    /// Check that this host can run forkd and that the daemon answers.
    #[command(
        long_about = "Check the host and the daemon: platform, KVM (and whether it can run \
            the guest kernel or guests fall back to TCG), QEMU version, firecracker \
            (optional), guest kernel and images, cgroups and their controllers, network \
            namespace and firewall tooling, free space in the data dir, userfaultfd, memfd, \
            KSM, huge pages, whether the daemon answers and accepts the token, and whether it requires one. Each \
            check is pass, warn, fail or skip, with a fix for anything but a pass. Exits 1 \
            when any check fails.",
        after_help = "Examples:\n  forkd doctor\n  forkd doctor --json\n  forkd doctor --no-daemon"
    )]
    Doctor(DoctorArgs),

    /// forkd's main job end to end: preflight, start what is missing, bake, fork, time it.
    #[command(
        long_about = "Run forkd's main job on a machine where it is built (scripts/quickstart.sh does \
            the host setup and the build first): check the host as `forkd doctor` does, list the \
            steps still missing (start the daemon next to this binary, bake a warmed python \
            snapshot) and run them once confirmed (--yes: without asking), fork N children, have \
            each say its hostname and a fresh UUID, print the timings and what to try next. The \
            children are killed at the end unless --keep.",
        after_help = "Examples:\n  forkd quickstart\n  forkd quickstart --yes -n 3\n  forkd quickstart --yes --keep"
    )]
    Quickstart(QuickstartArgs),

    /// Probe userfaultfd write-protection on a memfd (no daemon needed).
    #[command(
        name = "wp-bench",
        long_about = "Time the write-protect copy a branch can use to capture a running guest's \
            memory without stopping it, on a memfd of --region-mib: fill it, arm \
            UFFDIO_WRITEPROTECT over all of it (the only pause), copy every page in the \
            background while a fault handler copies first any page a writer touches \
            (--dirty-pages of them), then check that the copy in --snapshot is the memory as \
            armed. Needs Linux 5.19+ and root (or vm.unprivileged_userfaultfd=1).",
        after_help = "Examples:\n  forkd wp-bench\n  forkd wp-bench --region-mib 256 --dirty-pages 1000 --json"
    )]
    WpBench(WpBenchArgs),

    /// Find forkd resources no live VMM owns; remove them with --yes.
    #[command(
        long_about = "List work dirs (and their sockets) and staging dirs under the data \
            dir, forkd/* cgroups and forkd-* network namespaces that no live VMM owns. A VMM \
            is live when a qemu-system process names the resource; when the daemon answers, \
            the sandboxes it lists and the snapshots it is writing are kept too. Dry run by \
            default: --yes removes what is listed. The daemon's own reconciler does the same \
            every few seconds; this is for hosts whose daemon is gone.",
        after_help = "Examples:\n  forkd cleanup\n  forkd cleanup --data-dir /var/lib/forkd --yes"
    )]
    Cleanup(CleanupArgs),

    /// Print a shell completion script.
    #[command(
        long_about = "Print a completion script for a shell to stdout. Needs no daemon.",
        after_help = "Examples:\n  \
            forkd completions bash > /etc/bash_completion.d/forkd\n  \
            forkd completions zsh > \"${fpath[1]}/_forkd\"\n  \
            forkd completions fish > ~/.config/fish/completions/forkd.fish"
    )]
    Completions(CompletionsArgs),

    /// Create an empty ext4 volume file to attach with --volume.
    #[command(
        name = "volume-create",
        long_about = "Create an ext4 image file of the given size (staged, then renamed into \
            place; an existing file is never overwritten). Attach it to a snapshot with \
            `forkd snapshot --volume FILE:/guest/path[:ro]` (every child inherits it), or to \
            sandboxes and workspaces of their own with `forkd fork|workspace create --volume …` \
            (plugged into the snapshot's spare slots). The daemon takes volumes only from \
            under its --volume-root (default /var/lib/forkd/volumes): a bare file name is \
            created there ($FORKD_VOLUME_ROOT overrides). Needs mkfs.ext4 (e2fsprogs) on this \
            machine; no daemon.",
        after_help = "Examples:\n  forkd volume-create data.ext4 --size-mib 256        # /var/lib/forkd/volumes/data.ext4\n  \
            forkd volume-create /srv/forkd-volumes/x.ext4       # with forkd-server --volume-root /srv/forkd-volumes"
    )]
    VolumeCreate(VolumeCreateArgs),

    /// Serve the daemon as MCP tools for AI agents (stdio, or HTTP with --http).
    #[command(
        long_about = "Run a Model Context Protocol server whose tools drive the daemon: list and \
            create snapshots, spawn, inspect and kill sandboxes, run commands and Python, start \
            background processes and read their output, read and write files, branch sandboxes. \
            It speaks MCP on stdin/stdout (the way editors and desktop assistants start servers) or, \
            with --http, streamable HTTP at http://ADDR/mcp. It connects to the daemon with the \
            global options (--url, --token, --token-file, --ca-cert) or their FORKD_* variables.",
        after_help = "Examples:\n  forkd mcp\n  forkd mcp --http 127.0.0.1:8765\n  \
            FORKD_URL=https://forkd.example:8889 FORKD_TOKEN_FILE=~/.forkd-token forkd mcp"
    )]
    Mcp(McpArgs),

    /// E2B compatibility: point E2B's SDKs at this daemon.
    #[command(subcommand)]
    E2b(E2bCommand),

    /// The image store: list, inspect, remove, import, pull and build images.
    #[command(
        subcommand,
        long_about = "Manage the daemon's image store: the root file systems snapshots boot from, \
            with their OCI configuration (env, working dir, user). The built-in images python and \
            minimal come with the guest; others are imported from an OCI image layout, an OCI \
            archive or a `docker save` tarball, pulled from a registry, or built from a base with \
            Debian and pip packages. An image is named by any of its names or by its digest \
            (sha256:…; a unique prefix of it will do). `forkd snapshot --image` takes either.",
        after_help = "Examples:\n  \
            forkd image ls\n  \
            forkd image import ./app-layout --name team/app:1\n  \
            forkd image pull localhost:5000/team/app:1\n  \
            forkd image build py-req --from python --pip requests\n  \
            forkd image inspect team/app:1\n  \
            forkd image rm team/app:1"
    )]
    Image(ImageCommand),

    /// Build a parent image: `image build`, `image import` or `image pull` by what it is given.
    #[command(subcommand)]
    Parent(ParentCommand),

    /// Get an image (from the store, a local path or a registry) and snapshot it.
    #[command(
        long_about = "Get an image and bake a snapshot of it: REF is used as it is when it names \
            an image of the store (a name or digest); an existing local path is imported (an OCI \
            image layout directory, an OCI archive or a `docker save` tarball); anything else is \
            pulled from its registry. The snapshot is then created from the image's digest and \
            waited for, as `forkd snapshot` does.",
        after_help = "Examples:\n  \
            forkd from-image python --tag py\n  \
            forkd from-image ./app.tar --tag app --mem-mib 512\n  \
            forkd from-image localhost:5000/team/app:1 --tag app --vcpus 2"
    )]
    FromImage(FromImageArgs),

    /// Run one command in a fresh child of an image, like `docker run --rm`.
    #[command(
        long_about = "Run a command in a fresh sandbox of an image and exit with its status.\n\n\
            The image is found as `forkd from-image` finds it (the store, a local path to \
            import, or a registry to pull from); with --apt or --pip a derived image is built \
            from it (the daemon caches builds by their inputs). A snapshot of the image is \
            baked once and reused by later runs: its tag is run-<12 hex digits> of a hash of \
            the image's digest and the memory and vCPU settings (or --tag). One child is \
            forked from it, the command runs with this process's stdin, stdout and stderr \
            attached (on a terminal when stdin and stdout are both terminals, as `exec -it`), \
            and the child is killed afterwards — also on Ctrl-C or an error — unless --keep. \
            Signals are passed on as `forkd exec -i` does; when the command has not ended 3s \
            after one, or at a second, the child is killed and forkd exits 128+N. --timings \
            prints how long each phase took (image, build, bake, fork, exec, kill) on stderr.",
        after_help = "Examples:\n  \
            forkd run --image python -- python3 -c 'print(2 + 2)'\n  \
            forkd run --image python --pip requests -- python3 -c 'import requests'\n  \
            forkd run --image ./app-layout -e MODE=test --workdir /app -- ./check.sh\n  \
            forkd run --image python --timings -- true\n  \
            forkd run --image python -- bash          # interactive on a terminal"
    )]
    Run(RunArgs),
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// List the images of the store.
    #[command(
        visible_alias = "list",
        long_about = "List the store's images as a table: NAMES DIGEST SOURCE SIZE RUNTIME CREATED. \
            DIGEST is the first 12 hex digits (the built-in images have none); RUNTIME is python \
            when the image has python3 (its snapshots get the warm interpreter).",
        after_help = "Examples:\n  forkd image ls\n  forkd image ls --json"
    )]
    Ls,

    /// Print everything about one image as JSON.
    #[command(after_help = "Examples:\n  forkd image inspect python\n  forkd image inspect sha256:3f2a9c")]
    Inspect(ImageRefArg),

    /// Remove images, or only one of an image's names.
    #[command(
        visible_alias = "remove",
        long_about = "Remove images. Given one of several names of an image, only that name goes; \
            given its last name or its digest, the image goes. An image a snapshot was made from \
            is refused (exit 4) until those snapshots are deleted.",
        after_help = "Examples:\n  forkd image rm team/app:1\n  forkd image rm sha256:3f2a9c0d1e2f"
    )]
    Rm(ImageRmArgs),

    /// Import an OCI image layout, an OCI archive or a `docker save` tarball.
    #[command(
        long_about = "Send an image to the daemon's store. PATH is an OCI image layout directory \
            (oci-layout, index.json, blobs/; it is streamed as a tar, which is what an OCI \
            archive is), an OCI archive file, or a `docker save` tarball. The daemon applies the \
            layers in order with their whiteouts and writes the root file system; nothing is \
            visible until it is complete. Prints the image's name and digest.",
        after_help = "Examples:\n  \
            forkd image import ./app-layout --name team/app:1\n  \
            docker save app:1 -o app.tar && forkd image import app.tar\n  \
            forkd image import multi.tar --ref app:2 --name app2"
    )]
    Import(ImageImportArgs),

    /// Pull an image from a registry (linux/amd64).
    #[command(
        long_about = "Have the daemon pull an image from a registry, verifying every blob's \
            digest, with one progress bar per layer. The image is named by the reference unless \
            --name is given. --json prints only the final image.",
        after_help = "Examples:\n  \
            forkd image pull localhost:5000/team/app:1\n  \
            forkd image pull docker.io/library/python:3.12-slim --name py312"
    )]
    Pull(ImagePullArgs),

    /// Build an image from a base with Debian packages, pip packages and commands.
    #[command(
        long_about = "Have the daemon build an image: the base (--from: python, the default, \
            minimal, or an image of the store) with Debian packages (--apt), then pip packages \
            (--pip), then commands (--run, each through sh -c), in that order. Builds are cached \
            by a digest of their inputs: the same inputs again are answered at once. The build's \
            output is shown as it comes.",
        after_help = "Examples:\n  \
            forkd image build py-req --pip requests\n  \
            forkd image build tools --from minimal --apt curl --apt jq\n  \
            forkd image build app-deps --from team/app:1 --pip flask --run 'mkdir -p /data'"
    )]
    Build(ImageBuildArgs),
}

#[derive(Args, Debug)]
pub struct ImageRefArg {
    /// An image name or digest (sha256:…, or a unique prefix of it).
    #[arg(value_name = "NAME|DIGEST", value_parser = parse_image_ref)]
    pub image: String,
}

#[derive(Args, Debug)]
pub struct ImageRmArgs {
    /// Image names or digests.
    #[arg(value_name = "NAME|DIGEST", required = true, value_parser = parse_image_ref)]
    pub images: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ImageImportArgs {
    /// An OCI image layout directory, an OCI archive or a `docker save` tarball.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,

    /// Name of the image in the store (default: the name the archive gives it, if any).
    #[arg(long, value_name = "NAME", value_parser = parse_image_name)]
    pub name: Option<String>,

    /// Which image of an archive that holds several: its reference name or tag.
    #[arg(long = "ref", value_name = "REF", value_parser = parse_nonempty)]
    pub reference: Option<String>,

    /// Accept device nodes and FIFOs in layers (refused by default).
    #[arg(long)]
    pub allow_devices: bool,
}

#[derive(Args, Debug)]
pub struct ImagePullArgs {
    /// Registry reference, e.g. localhost:5000/team/app:1.
    #[arg(value_name = "REF", value_parser = parse_reference)]
    pub reference: String,

    /// Name of the image in the store (default: the reference).
    #[arg(long, value_name = "NAME", value_parser = parse_image_name)]
    pub name: Option<String>,
}

/// Packages and commands a build adds to its base.
#[derive(Args, Debug, Default, Clone)]
pub struct BuildSteps {
    /// A Debian package to install (apt-get). Repeatable.
    #[arg(long = "apt", value_name = "PKG", value_parser = parse_package)]
    pub apt: Vec<String>,

    /// A pip requirement to install (e.g. requests, numpy==2.1). Repeatable.
    #[arg(long = "pip", value_name = "PKG", value_parser = parse_package)]
    pub pip: Vec<String>,

    /// A shell command to run, after the packages. Repeatable, in order.
    #[arg(long = "run", value_name = "CMD", value_parser = parse_nonempty)]
    pub run: Vec<String>,
}

impl BuildSteps {
    pub fn is_empty(&self) -> bool {
        self.apt.is_empty() && self.pip.is_empty() && self.run.is_empty()
    }
}

#[derive(Args, Debug)]
pub struct ImageBuildArgs {
    /// Name of the built image.
    #[arg(value_name = "NAME", value_parser = parse_image_name)]
    pub name: String,

    /// Base: python (default), minimal, or an image of the store.
    #[arg(long, value_name = "python|minimal|IMAGE", value_parser = parse_image_ref)]
    pub from: Option<String>,

    #[command(flatten)]
    pub steps: BuildSteps,
}

#[derive(Subcommand, Debug)]
pub enum ParentCommand {
    /// Build, import or pull an image to snapshot parents from.
    #[command(
        long_about = "Make an image for parent snapshots, doing what its arguments ask:\n\n\
            With --apt, --extra, --pip or --run: `forkd image build`, from IMAGE (found as \
            `forkd from-image` finds it: the store, a local path to import, or a registry to \
            pull from), named --name or parent-<12 hex digits of its \
            inputs>. With --from, the first argument is instead the new image's name, exactly \
            as `forkd image build NAME --from BASE`.\n\n\
            Without them: IMAGE is imported when it is a local path (`forkd image import`), \
            and pulled otherwise (`forkd image pull`), named --name if given.",
        after_help = "Examples:\n  \
            forkd parent build python --extra curl --pip requests\n  \
            forkd parent build py-tools --from python --apt jq\n  \
            forkd parent build ./app-layout --name team/app:1\n  \
            forkd parent build localhost:5000/team/app:1"
    )]
    Build(ParentBuildArgs),
}

#[derive(Args, Debug)]
pub struct ParentBuildArgs {
    /// The base image, path or reference; with --from, the new image's name.
    #[arg(value_name = "IMAGE", value_parser = parse_nonempty)]
    pub image: String,

    /// Build from this base, naming the result IMAGE (as `image build IMAGE --from BASE`).
    #[arg(long, value_name = "python|minimal|IMAGE", value_parser = parse_image_ref)]
    pub from: Option<String>,

    /// Name of the resulting image.
    #[arg(long, value_name = "NAME", value_parser = parse_image_name, conflicts_with = "from")]
    pub name: Option<String>,

    /// A Debian package to install (apt-get). Repeatable.
    #[arg(long = "apt", visible_alias = "extra", value_name = "PKG", value_parser = parse_package)]
    pub apt: Vec<String>,

    /// A pip requirement to install. Repeatable.
    #[arg(long = "pip", value_name = "PKG", value_parser = parse_package)]
    pub pip: Vec<String>,

    /// A shell command to run, after the packages. Repeatable, in order.
    #[arg(long = "run", value_name = "CMD", value_parser = parse_nonempty)]
    pub run: Vec<String>,

    /// With an archive path: which image of an archive that holds several.
    #[arg(long = "ref", value_name = "REF", value_parser = parse_nonempty)]
    pub reference: Option<String>,

    /// With a path: accept device nodes and FIFOs in layers.
    #[arg(long)]
    pub allow_devices: bool,

    /// Names the image after FILE (`-o py.ext4` is image `py`, which
    /// `forkd snapshot --rootfs py.ext4` then finds): images live in the
    /// daemon's store, not in files of the client.
    #[arg(long, short = 'o', value_name = "FILE", conflicts_with_all = ["name", "from"])]
    pub output: Option<PathBuf>,

    /// Accepted for the reference's command line; images are sized to their
    /// contents (each child writes to its own overlay), so it has no effect.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub size_mib: Option<u32>,
}

impl ParentBuildArgs {
    pub fn steps(&self) -> BuildSteps {
        BuildSteps { apt: self.apt.clone(), pip: self.pip.clone(), run: self.run.clone() }
    }
}

#[derive(Args, Debug)]
pub struct FromImageArgs {
    /// An image of the store (name or digest), a local path to import, or a
    /// registry reference to pull.
    #[arg(value_name = "REF", value_parser = parse_nonempty)]
    pub image: String,

    /// Tag of the new snapshot.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Tag,

    /// Guest memory in MiB (daemon default: 256).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub mem_mib: Option<u32>,

    /// vCPUs of the VM (daemon default: 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: Option<u32>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The image: of the store (name or digest), a local path to import, or a
    /// registry reference to pull.
    #[arg(long, value_name = "REF", value_parser = parse_nonempty)]
    pub image: String,

    /// A Debian package to add to the image first (cached build). Repeatable.
    #[arg(long = "apt", visible_alias = "extra", value_name = "PKG", value_parser = parse_package)]
    pub apt: Vec<String>,

    /// A pip requirement to add to the image first (cached build). Repeatable.
    #[arg(long = "pip", value_name = "PKG", value_parser = parse_package)]
    pub pip: Vec<String>,

    /// Guest kernel: only the daemon's own is accepted (its snapshot is
    /// refused with any other).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Accepted for the reference's command line and ignored: each sandbox
    /// gets a network of its own.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,

    /// Accepted for the reference's command line and ignored: images are
    /// cached by the daemon.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,

    /// Snapshot to bake or reuse instead of run-<hash>.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Option<Tag>,

    /// Guest memory in MiB of the snapshot (daemon default: 256).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub mem_mib: Option<u32>,

    /// vCPUs of the snapshot (daemon default: 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: Option<u32>,

    /// An environment variable KEY=VALUE for the command. Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,

    /// Working directory of the command (default: the image's).
    #[arg(long, short = 'w', visible_alias = "cwd", value_name = "DIR", value_parser = parse_guest_dir)]
    pub workdir: Option<String>,

    /// Leave the sandbox running afterwards (its id goes to stderr).
    #[arg(long)]
    pub keep: bool,

    /// Print how long each phase took on stderr.
    #[arg(long)]
    pub timings: bool,

    /// The command and its arguments.
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum E2bCommand {
    /// Print the environment that points E2B's SDKs at this daemon.
    #[command(
        long_about = "Print E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY for the daemon the global \
            options name (--url, --token, --token-file), as shell exports: E2B's Python and \
            JavaScript SDKs then create sandboxes on forkd, unchanged. A template is a forkd \
            snapshot tag. The key is the token itself: keep the output private.",
        after_help = "Examples:\n  eval \"$(forkd e2b env)\"\n  forkd e2b env --json"
    )]
    Env,
}

#[derive(Args, Debug)]
pub struct McpArgs {
    /// Serve streamable HTTP on this address (path /mcp) instead of stdio.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,

    /// Allow --http on a non-loopback address. Whoever reaches it drives the
    /// daemon with this client's token.
    #[arg(long, requires = "http")]
    pub insecure_bind: bool,
}

#[derive(Args, Debug)]
pub struct VolumeCreateArgs {
    /// The image file to create: a path, or a bare file name to create in
    /// the volume root ($FORKD_VOLUME_ROOT, default /var/lib/forkd/volumes).
    pub path: PathBuf,
    /// Size in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=1048576))]
    pub size_mib: u32,
    /// Fill the file system with this directory's contents.
    #[arg(long, value_name = "DIR")]
    pub from_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Snapshot to fork from (must be ready).
    #[arg(long, value_name = "TAG")]
    pub tag: Tag,
    /// Fan-out sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100")]
    pub fanout: Vec<u32>,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 20)]
    pub execs: u32,
    /// Skip the bare-restore comparison.
    #[arg(long)]
    pub no_bare: bool,
    /// Bare restores started at once (match the daemon's --spawn-concurrency).
    #[arg(long, default_value_t = 8)]
    pub bare_concurrency: usize,
    /// Times each fan-out runs, forkd then bare, pair by pair: the table
    /// shows the medians and the median of the pairs' ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Also print where a spawn's time goes, cold and from a hot pool.
    #[arg(long)]
    pub phases: bool,
    /// Draw the latency distributions (spawns per child, cold and pooled;
    /// exec round trips, at rest and during a refill) into this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Only snapshots with this status (writing, ready, failed, deleting).
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Tag of the new snapshot. Optional with --from-sandbox (the daemon
    /// picks one).
    #[arg(long, short = 't', value_name = "TAG", required_unless_present = "from_sandbox")]
    pub tag: Option<Tag>,

    /// Image to boot: python, minimal, an image of the store (see `forkd
    /// image ls`), or the path of an image file.
    #[arg(
        long,
        value_name = "python|minimal|IMAGE|PATH",
        value_parser = parse_image,
        required_unless_present_any = ["from_sandbox", "rootfs"],
        conflicts_with = "from_sandbox"
    )]
    pub image: Option<String>,

    /// The reference's spelling of --image PATH: a root file system image file.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["from_sandbox", "image"])]
    pub rootfs: Option<String>,

    /// The reference's guest kernel: only the daemon's own may be named
    /// (forkd boots every guest with its kernel).
    #[arg(long, value_name = "PATH", conflicts_with = "from_sandbox")]
    pub kernel: Option<String>,

    /// Least seconds the guest warms up before the snapshot is taken.
    #[arg(long, value_name = "SECS", conflicts_with = "from_sandbox")]
    pub boot_wait_secs: Option<u32>,

    /// vCPUs of the VM (daemon default: 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "from_sandbox")]
    pub vcpus: Option<u32>,

    /// Guest memory in MiB (daemon default: 256).
    #[arg(long, visible_alias = "mem-size-mib", value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "from_sandbox")]
    pub mem_mib: Option<u32>,

    /// Python code run in the warm interpreter before the snapshot is taken.
    #[arg(long, value_name = "CODE", conflicts_with = "from_sandbox")]
    pub warm_eval: Option<String>,

    /// How long the daemon waits for the runtime to become ready
    /// (daemon default: 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_secs, conflicts_with = "from_sandbox")]
    pub warm_timeout: Option<u32>,

    /// A file every child sees: HOST_FILE:GUEST_PATH[:ro]. Repeatable.
    #[arg(
        long = "volume",
        short = 'v',
        value_name = "HOST_FILE:GUEST_PATH[:ro]",
        value_parser = parse_volume,
        conflicts_with = "from_sandbox"
    )]
    pub volumes: Vec<String>,

    /// A label KEY=VALUE. Repeatable.
    #[arg(
        long = "label",
        short = 'l',
        value_name = "KEY=VALUE",
        value_parser = parse_key_value,
        conflicts_with = "from_sandbox"
    )]
    pub labels: Vec<(String, String)>,

    /// Return as soon as the daemon accepted the request.
    #[arg(long)]
    pub no_wait: bool,

    /// Branch this running sandbox instead of booting an image.
    #[arg(long, value_name = "ID")]
    pub from_sandbox: Option<SandboxId>,

    /// Save only the pages written since the sandbox's snapshot (default).
    #[arg(long, requires = "from_sandbox", conflicts_with_all = ["full", "image"])]
    pub diff: bool,

    /// Save a flat copy of the sandbox's whole memory.
    #[arg(long, requires = "from_sandbox", conflicts_with = "image")]
    pub full: bool,

    /// Only report how many bytes a diff branch would hold; take no branch.
    #[arg(long, requires = "from_sandbox", conflicts_with_all = ["full", "tag", "image"])]
    pub measure: bool,
}

#[derive(Args, Debug)]
pub struct TagArg {
    /// Snapshot tag.
    #[arg(value_name = "TAG")]
    pub tag: Tag,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,
}

#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Snapshots to delete.
    #[arg(value_name = "TAG", required = true)]
    pub tags: Vec<Tag>,

    /// Also delete every snapshot that depends on these.
    #[arg(long, conflicts_with = "force")]
    pub cascade: bool,

    /// Delete even if others depend on it; they are left "failed".
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ShareArgs {
    /// Snapshot to share.
    #[arg(value_name = "TAG")]
    pub tag: Tag,

    /// Make it private again.
    #[arg(long)]
    pub off: bool,
}

#[derive(Args, Debug)]
pub struct PackArgs {
    /// Snapshot to pack.
    #[arg(value_name = "TAG", required_unless_present = "tag_flag", conflicts_with = "tag_flag")]
    pub tag: Option<Tag>,

    /// The snapshot, as a flag (the reference's spelling).
    #[arg(long = "tag", value_name = "TAG")]
    pub tag_flag: Option<Tag>,

    /// Archive to write (.tar.zst); default ./TAG.forkd-snapshot.tar.zst.
    #[arg(short = 'o', long, visible_alias = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// A description recorded in the archive's manifest (shown by unpack).
    #[arg(long, value_name = "TEXT", value_parser = parse_note)]
    pub description: Option<String>,

    /// The upstream image the snapshot came from, recorded in the manifest.
    #[arg(long, value_name = "IMAGE", value_parser = parse_note)]
    pub base_image: Option<String>,

    /// One flat image of the snapshot, without its ancestors.
    #[arg(long, conflicts_with = "layer_only")]
    pub flat: bool,

    /// Only the snapshot's own diff layer (the importing host needs its parent).
    #[arg(long)]
    pub layer_only: bool,
}

#[derive(Args, Debug)]
pub struct UnpackArgs {
    /// Archive made by `forkd pack`.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Tag for the archive's snapshot here (its ancestors keep their tags).
    #[arg(long = "as", visible_alias = "tag", value_name = "NEWTAG")]
    pub as_tag: Option<Tag>,

    /// Replace a snapshot of the same tag: it is deleted (refused while
    /// sandboxes or branches use it) just before the archive is imported.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// TAG, or TAG URL; with --tag, just URL. A URL (http:// or https://,
    /// e.g. a presigned PUT URL) gets the archive `forkd pack` writes, by
    /// HTTP PUT; without one the snapshot goes to the daemon's remote.
    #[arg(value_name = "TAG|URL", num_args = 0..=2)]
    pub targets: Vec<String>,

    /// The snapshot, as a flag (the reference's spelling).
    #[arg(long = "tag", value_name = "TAG")]
    pub tag: Option<Tag>,

    /// With a URL: a description recorded in the archive's manifest.
    #[arg(long, value_name = "TEXT", value_parser = parse_note)]
    pub description: Option<String>,

    /// With a URL: the upstream image, recorded in the archive's manifest.
    #[arg(long, value_name = "IMAGE", value_parser = parse_note)]
    pub base_image: Option<String>,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// A snapshot tag of the daemon's remote, or the http(s):// URL of an
    /// archive made by `forkd pack` (downloaded, then unpacked).
    #[arg(value_name = "TAG|URL")]
    pub target: String,

    /// With a URL: the tag the archive's snapshot gets here.
    #[arg(long = "tag", visible_alias = "as", value_name = "NEWTAG")]
    pub as_tag: Option<Tag>,

    /// With a URL: replace a snapshot of the same tag (as `unpack --force`).
    #[arg(long)]
    pub force: bool,

    /// With an OWNER/NAME target: the base URL the archive is fetched from
    /// (HUB/OWNER/NAME.forkd-snapshot.tar.zst). There is no default hub.
    #[arg(long, value_name = "URL", env = "FORKD_HUB_URL")]
    pub hub: Option<String>,
}

#[derive(Args, Debug)]
pub struct CompactArgs {
    /// Snapshot to copy.
    #[arg(value_name = "TAG")]
    pub tag: Tag,

    /// Tag of the flat copy.
    #[arg(long, value_name = "NEW")]
    pub to: Tag,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("command").required(true).args(["exec", "argv"])))]
pub struct SnapshotDiffArgs {
    /// Snapshot the transient sandbox is forked from (the new one's parent).
    #[arg(long, value_name = "TAG")]
    pub from: Tag,

    /// Tag of the new snapshot.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Tag,

    /// Command to run, as one string split like a shell would.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,

    /// Run --exec through `sh -c` (pipes, redirections, globbing).
    #[arg(long, requires = "exec")]
    pub sh: bool,

    /// How long the command may run (daemon default applies otherwise).
    #[arg(long = "exec-timeout", value_name = "DURATION", value_parser = parse_secs)]
    pub exec_timeout: Option<u32>,

    /// The command as separate arguments, after --.
    #[arg(last = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Network {
    /// No network device.
    None,
    /// Outbound through NAT, limited to --allow entries.
    Nat,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Nat => "nat",
        }
    }
}

/// Settings a sandbox or workspace is started with.
#[derive(Args, Debug, Default)]
pub struct Resources {
    /// Memory limit per sandbox in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory_limit_mib: Option<u32>,

    /// CPU quota in cores per sandbox (0.5 = half a core).
    #[arg(long, value_name = "CORES", value_parser = parse_cpu_quota)]
    pub cpu_quota: Option<f64>,

    /// Networking: none (default) or nat.
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<Network>,

    /// Kill after this long (e.g. 300, 10m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub ttl: Option<u32>,

    /// Kill after this long without activity.
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub idle_timeout: Option<u32>,

    /// A label KEY=VALUE. Repeatable.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// A host file to mount: HOST_FILE:GUEST_PATH[:ro]. Repeatable.
    #[arg(
        long = "volume",
        short = 'v',
        value_name = "HOST_FILE:GUEST_PATH[:ro]",
        value_parser = parse_volume
    )]
    pub volumes: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// Snapshot to fork from.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Tag,

    /// How many sandboxes (1-1000).
    #[arg(
        short = 'n',
        long = "count",
        alias = "n",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub n: u32,

    #[command(flatten)]
    pub resources: Resources,

    /// Maximum number of processes in each sandbox.
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u32>,

    /// Egress allow-list entry for --network nat: CIDR[:PORT]. Repeatable.
    #[arg(long, value_name = "CIDR[:PORT]")]
    pub allow: Vec<String>,

    /// Give each sandbox its own network namespace (implied by nat).
    #[arg(long)]
    pub per_child_netns: bool,

    /// Afterwards fill the snapshot's hot pool with N children, restored and
    /// re-initialized ahead of time, so later forks only apply their identity
    /// (filled once; emptied when the snapshot is deleted or the daemon stops).
    #[arg(long)]
    pub prewarm: bool,

    /// Back guest memory with huge pages.
    #[arg(long)]
    pub hugepages: bool,

    /// Fork from the live parent without a saved snapshot (backend permitting).
    #[arg(long)]
    pub live_fork: bool,

    /// Pull the snapshot from the daemon's remote first if it is not on the
    /// daemon's host (the default when the daemon has a remote).
    #[arg(long, conflicts_with = "no_pull_missing")]
    pub pull_missing: bool,

    /// Never pull: a snapshot that is not on the host is NOT_FOUND.
    #[arg(long)]
    pub no_pull_missing: bool,

    /// Print only the new ids, one per line.
    #[arg(long, short = 'q', conflicts_with = "json")]
    pub quiet: bool,

    /// The reference's fork test: wait this long after the fork, report
    /// how many children are alive (each answers a ping), then kill them.
    #[arg(long, value_name = "SECS")]
    pub settle_secs: Option<u64>,

    /// With --settle-secs: leave the children running instead of killing
    /// them (a child's work dir goes with it when it is killed).
    #[arg(long, requires = "settle_secs")]
    pub keep_workdir: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only children of this snapshot.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Option<Tag>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "tag", "all"])))]
pub struct KillArgs {
    /// Sandboxes to kill.
    #[arg(value_name = "ID")]
    pub ids: Vec<SandboxId>,

    /// Kill every child of this snapshot.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Option<Tag>,

    /// Kill every sandbox.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("process_mode").multiple(true).args(["stdin", "tty", "detach"])))]
pub struct ExecArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// Kill the command after this long (daemon default: 60s; no limit with -i, -t
    /// or -d).
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub timeout: Option<u32>,

    /// An environment variable KEY=VALUE. Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,

    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    pub cwd: Option<String>,

    /// Stream this process's stdin to the command (with -d: keep the
    /// command's stdin open for the API's SendStdin).
    #[arg(long = "stdin", short = 'i', visible_alias = "interactive")]
    pub stdin: bool,

    /// Run the command on a pseudo-terminal; -it for an interactive session.
    #[arg(long, short = 't')]
    pub tty: bool,

    /// Start the command in the background; print its pid and tag.
    #[arg(long, short = 'd')]
    pub detach: bool,

    /// Name the process for attach and signal (with -d, -i or -t).
    #[arg(long, value_name = "TAG", requires = "process_mode", value_parser = parse_process_tag)]
    pub tag: Option<String>,

    /// The command and its arguments.
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// The process: its pid or its tag.
    #[arg(value_name = "PID|TAG", value_parser = parse_process)]
    pub process: String,

    /// Print only output written from now on.
    #[arg(long)]
    pub no_replay: bool,
}

#[derive(Args, Debug)]
pub struct SignalArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// The process: its pid or its tag.
    #[arg(value_name = "PID|TAG", value_parser = parse_process)]
    pub process: String,

    /// A signal name (TERM, SIGINT, kill) or number (1-64).
    #[arg(value_name = "SIGNAL")]
    pub signal: String,
}

/// `[LOCAL:]PORT` of `forkd port-forward`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PortMapping {
    pub local: u16,
    pub remote: u16,
}

pub fn parse_port_mapping(s: &str) -> Result<PortMapping, String> {
    let port = |p: &str, what: &str, zero_ok: bool| -> Result<u16, String> {
        let n: u16 = p.parse().map_err(|_| format!("{what} {p:?} is not a port number (0-65535)"))?;
        if n == 0 && !zero_ok {
            return Err(format!("{what} must be 1-65535"));
        }
        Ok(n)
    };
    match s.split_once(':') {
        Some((l, r)) => Ok(PortMapping { local: port(l, "local port", true)?, remote: port(r, "port", false)? }),
        None => {
            let r = port(s, "port", false)?;
            Ok(PortMapping { local: r, remote: r })
        }
    }
}

#[derive(Args, Debug)]
pub struct PortForwardArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// `[LOCAL:]PORT`: the sandbox's PORT on local port LOCAL (default: the same).
    #[arg(value_name = "[LOCAL:]PORT", value_parser = parse_port_mapping)]
    pub ports: PortMapping,

    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: std::net::IpAddr,
}

#[derive(Args, Debug)]
pub struct UrlArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// Port in the sandbox (1-65535).
    #[arg(value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,

    /// Make (or show) a link that needs no token.
    #[arg(long, conflicts_with = "unshare")]
    pub share: bool,

    /// Remove the port's link.
    #[arg(long)]
    pub unshare: bool,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Sandboxes to show (default: all).
    #[arg(value_name = "ID")]
    pub ids: Vec<SandboxId>,

    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,

    /// Print one table and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// Absolute guest directory to watch.
    #[arg(value_name = "PATH", value_parser = parse_guest_dir)]
    pub path: String,

    /// Only the directory itself, not the ones below it.
    #[arg(long)]
    pub no_recursive: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Sandbox id (sb-…).
    #[arg(value_name = "ID")]
    pub id: SandboxId,

    /// Python code, or - to read it from stdin.
    #[arg(value_name = "CODE", allow_hyphen_values = true)]
    pub code: String,

    /// Give up on the evaluation after this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub timeout: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// List the snapshots the remote holds.
    #[command(visible_alias = "list", after_help = "Examples:\n  forkd remote ls\n  forkd remote ls --json")]
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// List the hot pools: per snapshot, children ready, being made, kept.
    #[command(
        visible_alias = "list",
        long_about = "List the hot pools of the snapshots you may fork from: children restored, \
            re-initialized once and paused, which forks take first. READY can be taken now, FILLING \
            are being made, TARGET is what the daemon keeps (forkd-server --pool TAG=N; 0 for a pool \
            a fork's --prewarm filled once).",
        after_help = "Examples:\n  forkd pool ls\n  forkd pool ls --json"
    )]
    Ls,
    /// Keep N hot children of a snapshot ready (0 empties its pool).
    #[command(
        long_about = "Set how many hot children of a ready snapshot the daemon keeps, as \
            forkd-server --pool TAG=N does (until the daemon restarts). The pool fills in the \
            background, one child at a time at the lowest CPU weight; forks take from it first. 0 \
            empties it. Admins only.",
        after_help = "Examples:\n  forkd pool set py 8\n  forkd pool set py 0"
    )]
    Set(PoolSetArgs),
}

#[derive(Args, Debug)]
pub struct PoolSetArgs {
    /// Snapshot tag.
    #[arg(value_name = "TAG")]
    pub tag: Tag,
    /// Children to keep ready (0..=64).
    #[arg(value_name = "N", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub target: u32,
    /// The network the children are made with, for forks with that
    /// network: none, or nat (namespace and address made ahead of time, no
    /// egress until a fork installs its allow-list). Changing it empties
    /// the pool.
    #[arg(long, value_parser = ["none", "nat"], default_value = "none")]
    pub network: String,
}

#[derive(Subcommand, Debug)]
pub enum WorkspaceCommand {
    /// Create a workspace and start its sandbox.
    #[command(after_help = "Example:\n  forkd workspace create dev --tag py --memory-limit-mib 1024")]
    Create(WorkspaceCreateArgs),
    /// Show one workspace.
    Get(NameArg),
    /// List workspaces.
    #[command(visible_alias = "ls")]
    List,
    /// Save a workspace's state and stop its sandbox.
    Suspend(NameArg),
    /// Start a suspended workspace again from its saved state.
    Resume(NameArg),
    /// Kill a workspace's sandbox and delete its saved state.
    #[command(visible_alias = "rm")]
    Delete(NameArg),
}

#[derive(Args, Debug)]
pub struct NameArg {
    /// Workspace name.
    #[arg(value_name = "NAME")]
    pub name: WorkspaceName,
}

#[derive(Args, Debug)]
pub struct WorkspaceCreateArgs {
    /// Workspace name: letters, digits, '_' and '-', at most 64.
    #[arg(value_name = "NAME")]
    pub name: WorkspaceName,

    /// Snapshot the workspace starts from.
    #[arg(long, short = 't', value_name = "TAG")]
    pub tag: Tag,

    #[command(flatten)]
    pub resources: Resources,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The daemon's data dir (free space is checked there).
    #[arg(long, env = "FORKD_DATA_DIR", default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Guest kernel, initramfs and images. Default: <data-dir>/guest when it
    /// holds a kernel, else /var/lib/forkd/guest.
    #[arg(long, env = "FORKD_GUEST_DIR", value_name = "DIR")]
    pub guest_dir: Option<PathBuf>,

    /// Skip the daemon check (host checks only).
    #[arg(long)]
    pub no_daemon: bool,

    /// First uid of the daemon's VMM uid range (as forkd-server's flag); the
    /// confinement probe runs QEMU as the last uid of the range.
    #[arg(long, env = "FORKD_VMM_UID_BASE", default_value_t = 2_000_000_000)]
    pub vmm_uid_base: u32,

    /// Size of the daemon's VMM uid range.
    #[arg(long, env = "FORKD_VMM_UID_COUNT", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub vmm_uid_count: u32,
}

impl DoctorArgs {
    /// The guest dir the daemon would use with the same flags.
    pub fn guest_dir(&self) -> PathBuf {
        self.guest_dir.clone().unwrap_or_else(|| {
            let own = self.data_dir.join("guest");
            if own.join("vmlinux").exists() { own } else { PathBuf::from("/var/lib/forkd/guest") }
        })
    }
}

#[derive(Args, Debug)]
pub struct WpBenchArgs {
    /// Region size in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub region_mib: u64,

    /// Where the copy is written.
    #[arg(long, default_value = "/tmp/forkd-wp-bench.snapshot", value_name = "PATH")]
    pub snapshot: PathBuf,

    /// Pages a writer changes while the copy runs (each is copied by the
    /// fault handler before its write goes through).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub dirty_pages: u64,

    /// Keep the copy afterwards.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Args, Debug)]
pub struct QuickstartArgs {
    /// Run the missing steps without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,

    /// Children to fork (1-1000).
    #[arg(short = 'n', long = "count", alias = "n", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub n: u32,

    /// Snapshot to bake (if missing) and fork from.
    #[arg(long, short = 't', default_value = "python")]
    pub tag: Tag,

    /// Leave the children running.
    #[arg(long)]
    pub keep: bool,

    /// The daemon's data dir (for the preflight, and a daemon started here).
    #[arg(long, env = "FORKD_DATA_DIR", default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// The daemon's data dir.
    #[arg(long, env = "FORKD_DATA_DIR", default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Remove what is found (default: only list it).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct WhereArgs {
    /// Show the URL, versions, backend, data directory and counts.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// `KEY=VALUE`, with a non-empty key.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// A duration in whole seconds: `90`, `90s`, `5m`, `1h30m`.
pub fn parse_secs(s: &str) -> Result<u32, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: use whole seconds"));
    }
    u32::try_from(d.as_secs()).map_err(|_| format!("{s:?} is too long"))
}

/// A duration: a bare number is seconds (fractions allowed), otherwise a
/// humantime string such as `500ms`, `30s`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
        }
        return Err(format!("{s:?} is not a duration"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration ({e}); try 30, 30s or 5m"))
}

fn parse_cpu_quota(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of cores")),
    }
}

/// `python`, `minimal`, an image of the store (name or digest), or a path.
/// Paths are made absolute because the daemon resolves them itself and has
/// its own working directory. A path is what starts with `/` or `.`, or a
/// name with a `/` that is a file here; `team/app:1` is an image name.
pub fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the image must not be empty".into());
    }
    if s.starts_with(['/', '.']) || (s.contains('/') && std::path::Path::new(s).is_file()) {
        let abs = std::path::absolute(s).map_err(|e| format!("{s:?}: {e}"))?;
        return abs.to_str().map(str::to_string).ok_or_else(|| format!("{s:?}: path is not valid UTF-8"));
    }
    Ok(s.to_string())
}

/// `HOST_FILE:GUEST_PATH[:ro]`. A relative host path is made absolute for
/// the same reason as image paths.
pub fn parse_volume(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, mode) = match parts.as_slice() {
        [h, g] => (*h, *g, None),
        [h, g, m] => (*h, *g, Some(*m)),
        _ => return Err(format!("expected HOST_FILE:GUEST_PATH[:ro], got {s:?}")),
    };
    if host.is_empty() {
        return Err(format!("{s:?}: the host file is empty"));
    }
    if !guest.starts_with('/') {
        return Err(format!("{s:?}: the guest path must be absolute"));
    }
    if let Some(m) = mode.filter(|m| !matches!(*m, "ro" | "rw")) {
        return Err(format!("{s:?}: the mode must be ro or rw, not {m:?}"));
    }
    let host = std::path::absolute(host).map_err(|e| format!("{s:?}: {e}"))?;
    let host = host.to_str().ok_or_else(|| format!("{s:?}: path is not valid UTF-8"))?;
    Ok(match mode {
        Some(m) => format!("{host}:{guest}:{m}"),
        None => format!("{host}:{guest}"),
    })
}

/// A process tag, as the daemon accepts it: 1-64 of `[A-Za-z0-9._-]`,
/// starting with a letter or digit, not all digits (those name pids).
pub fn parse_process_tag(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: a tag is 1-64 of letters, digits, '.', '_' and '-', not all digits"))
    }
}

/// A process: a pid (digits, not 0) or a tag.
pub fn parse_process(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u32>() {
            Ok(pid) if pid > 0 => Ok(pid.to_string()),
            _ => Err(format!("{s:?} is not a pid")),
        };
    }
    parse_process_tag(s).map_err(|_| format!("{s:?} is neither a pid nor a process tag"))
}

/// An absolute guest path.
pub fn parse_guest_dir(s: &str) -> Result<String, String> {
    if s.starts_with('/') { Ok(s.to_string()) } else { Err(format!("{s:?}: the guest path must be absolute")) }
}

/// Longest image name the daemon keeps.
const IMAGE_NAME_MAX: usize = 255;

/// An image name as the daemon's store takes it: 1-255 of
/// `[A-Za-z0-9._-/:@+]`, starting with a letter or digit, without `..`,
/// and not a digest.
pub fn parse_image_name(s: &str) -> Result<String, String> {
    if s.starts_with("sha256:") {
        return Err(format!("{s:?} is a digest, not a name"));
    }
    let ok = !s.is_empty()
        && s.len() <= IMAGE_NAME_MAX
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b))
        && !s.contains("..");
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: an image name is 1-{IMAGE_NAME_MAX} of letters, digits and . _ - / : @ +, \
             starting with a letter or digit, without '..'"
        ))
    }
}

/// An image of the store: a name, or a digest `sha256:<hex>` (a prefix
/// of one will do: it is looked up).
pub fn parse_image_ref(s: &str) -> Result<String, String> {
    match s.strip_prefix("sha256:") {
        Some(hex)
            if !hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(s.to_string())
        }
        Some(_) => Err(format!("{s:?}: a digest is sha256: and up to 64 lowercase hex digits")),
        None => parse_image_name(s),
    }
}

/// Any non-empty text without control characters.
/// A manifest note (--description, --base-image), by the manifest's own rule.
pub fn parse_note(s: &str) -> Result<String, String> {
    match forkd_server::memory::pack::manifest::note_error(s) {
        Some(e) => Err(format!("it has {e}")),
        None => Ok(s.to_string()),
    }
}

pub fn parse_nonempty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{s:?} holds control characters"));
    }
    Ok(s.to_string())
}

/// A registry reference: one word.
pub fn parse_reference(s: &str) -> Result<String, String> {
    let s = parse_nonempty(s)?;
    if s.contains(char::is_whitespace) {
        return Err(format!("{s:?}: a reference holds no spaces (e.g. localhost:5000/team/app:1)"));
    }
    Ok(s)
}

/// A package for apt or pip: one word that is not an option.
pub fn parse_package(s: &str) -> Result<String, String> {
    let s = parse_reference(s).map_err(|_| format!("{s:?}: a package is one word without spaces, e.g. numpy==2.1"))?;
    if s.starts_with('-') {
        return Err(format!("{s:?}: a package may not start with '-'"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("forkd").chain(args.iter().copied()))
    }

    fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn usage_error(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(cli) => panic!("{args:?} parsed: {cli:?}"),
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
                e
            }
        }
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn globals() {
        let cli = ok(&["--url", "https://h:1", "--token", "t", "--timeout", "2.5", "ls", "--json"]);
        assert_eq!(cli.global.url, "https://h:1");
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        assert_eq!(cli.global.rpc_timeout, Some(std::time::Duration::from_millis(2500)));
        assert!(cli.global.json);
        // Globals are accepted after the command too.
        let cli = ok(&["images", "--url", "http://x:2", "--ca-cert", "/ca.pem"]);
        assert_eq!(cli.global.url, "http://x:2");
        assert_eq!(cli.global.ca_cert.as_deref(), Some(std::path::Path::new("/ca.pem")));
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for args in [&["--help"][..], &["--version"], &["fork", "--help"]] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{args:?}");
        }
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"));
        assert!(help.contains("daemon unreachable"));
    }

    #[test]
    fn missing_command_is_a_usage_error() {
        usage_error(&[]);
        usage_error(&["frobnicate"]);
    }

    #[test]
    fn version_and_where() {
        assert!(matches!(ok(&["version"]).command, Command::Version));
        assert!(matches!(ok(&["where"]).command, Command::Where(WhereArgs { all: false })));
        assert!(matches!(ok(&["where", "--all"]).command, Command::Where(WhereArgs { all: true })));
    }

    #[test]
    fn the_reference_spellings_are_accepted() {
        let c = ok(&["--daemon-url", "http://h:1", "--daemon-token", "t0k3n", "where"]);
        assert_eq!((c.global.url.as_str(), c.global.token.as_deref()), ("http://h:1", Some("t0k3n")));
        let Command::Cleanup(a) = ok(&["cleanup", "-y"]).command else { panic!() };
        assert!(a.yes);
    }

    #[test]
    fn images() {
        let Command::Images(a) = ok(&["images"]).command else { panic!() };
        assert_eq!(a.status, None);
        let Command::Images(a) = ok(&["snapshots", "--status", "ready"]).command else { panic!() };
        assert_eq!(a.status.as_deref(), Some("ready"));
    }

    #[test]
    fn snapshot_create() {
        let Command::Snapshot(a) = ok(&[
            "snapshot",
            "--tag",
            "py",
            "--image",
            "python",
            "--vcpus",
            "2",
            "--mem-mib",
            "512",
            "--warm-eval",
            "import numpy",
            "--warm-timeout",
            "2m",
            "-v",
            "/data/x:/mnt/x:ro",
            "--label",
            "a=b",
            "--no-wait",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(a.tag.unwrap().as_str(), "py");
        assert_eq!(a.image.as_deref(), Some("python"));
        assert_eq!(a.vcpus, Some(2));
        assert_eq!(a.mem_mib, Some(512));
        assert_eq!(a.warm_eval.as_deref(), Some("import numpy"));
        assert_eq!(a.warm_timeout, Some(120));
        assert_eq!(a.volumes, vec!["/data/x:/mnt/x:ro"]);
        assert_eq!(a.labels, vec![("a".into(), "b".into())]);
        assert!(a.no_wait);
        assert!(a.from_sandbox.is_none());
    }

    #[test]
    fn snapshot_image_paths_become_absolute() {
        let Command::Snapshot(a) = ok(&["snapshot", "-t", "x", "--image", "./img.ext4"]).command else { panic!() };
        let image = a.image.unwrap();
        assert!(image.starts_with('/'), "{image}");
        assert!(image.ends_with("img.ext4"), "{image}");
    }

    #[test]
    fn snapshot_create_needs_tag_and_image() {
        usage_error(&["snapshot", "--image", "python"]);
        usage_error(&["snapshot", "--tag", "py"]);
        usage_error(&["snapshot"]);
        let e = usage_error(&["snapshot", "--tag", "../etc", "--image", "python"]);
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(e.to_string().contains("tag"), "{e}");
        usage_error(&["snapshot", "--tag", "x", "--image", "python", "--vcpus", "0"]);
    }

    #[test]
    fn snapshot_branch() {
        let Command::Snapshot(a) = ok(&["snapshot", "--from-sandbox", "sb-abc"]).command else { panic!() };
        assert_eq!(a.from_sandbox.unwrap().as_str(), "sb-abc");
        assert!(a.tag.is_none());
        assert!(!a.full && !a.diff);
        let Command::Snapshot(a) = ok(&["snapshot", "--from-sandbox", "sb-abc", "--tag", "b", "--full"]).command else {
            panic!()
        };
        assert!(a.full);
        assert_eq!(a.tag.unwrap().as_str(), "b");
        ok(&["snapshot", "--from-sandbox", "sb-abc", "--diff"]);
        ok(&["snapshot", "--from-sandbox", "sb-abc", "--measure"]);
        usage_error(&["snapshot", "--from-sandbox", "sb-abc", "--diff", "--full"]);
        usage_error(&["snapshot", "--from-sandbox", "sb-abc", "--image", "python"]);
        usage_error(&["snapshot", "--from-sandbox", "nope"]);
        // clap skips `requires` when the required arg conflicts with one
        // present, so these rely on the explicit conflicts.
        usage_error(&["snapshot", "--tag", "x", "--image", "python", "--full"]);
        usage_error(&["snapshot", "--tag", "x", "--image", "python", "--diff"]);
        usage_error(&["snapshot", "--tag", "x", "--image", "python", "--measure"]);
        usage_error(&["snapshot", "--tag", "x", "--full"]);
    }

    #[test]
    fn snapshot_info_rmi_compact() {
        let Command::SnapshotInfo(a) = ok(&["snapshot-info", "py"]).command else { panic!() };
        assert_eq!(a.tag.as_str(), "py");
        usage_error(&["snapshot-info"]);
        usage_error(&["snapshot-info", "a/b"]);

        let Command::Rmi(a) = ok(&["rmi", "a", "b", "--cascade"]).command else { panic!() };
        assert_eq!(a.tags.len(), 2);
        assert!(a.cascade && !a.force);
        usage_error(&["rmi"]);
        usage_error(&["rmi", "a", "--cascade", "--force"]);

        let Command::Share(a) = ok(&["share", "x", "--off"]).command else { panic!() };
        assert!(a.off && a.tag.as_str() == "x");
        usage_error(&["share"]);
        let Command::Compact(a) = ok(&["compact", "x", "--to", "y"]).command else { panic!() };
        assert_eq!((a.tag.as_str(), a.to.as_str()), ("x", "y"));
        // The reference's spelling.
        let Command::Compact(a) = ok(&["snapshot-compact", "x", "--to", "y"]).command else { panic!() };
        assert_eq!(a.to.as_str(), "y");
        usage_error(&["compact", "x"]);
    }

    #[test]
    fn snapshot_diff() {
        let Command::SnapshotDiff(a) = ok(&[
            "snapshot-diff",
            "--from",
            "py",
            "--tag",
            "py2",
            "--exec",
            "pip install 'a b'",
            "--exec-timeout",
            "90",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(a.from.as_str(), "py");
        assert_eq!(a.exec.as_deref(), Some("pip install 'a b'"));
        assert_eq!(a.exec_timeout, Some(90));
        let Command::SnapshotDiff(a) =
            ok(&["snapshot-diff", "--from", "py", "--tag", "t", "--", "touch", "-a", "/x"]).command
        else {
            panic!()
        };
        assert_eq!(a.argv, vec!["touch", "-a", "/x"]);
        usage_error(&["snapshot-diff", "--from", "py", "--tag", "t"]);
        usage_error(&["snapshot-diff", "--from", "py", "--tag", "t", "--sh"]);
        usage_error(&["snapshot-diff", "--from", "py", "--tag", "t", "--exec", "x", "--", "y"]);
    }

    #[test]
    fn fork() {
        let Command::Fork(a) = ok(&[
            "fork",
            "--tag",
            "py",
            "-n",
            "3",
            "--memory-limit-mib",
            "512",
            "--cpu-quota",
            "0.5",
            "--pids-limit",
            "64",
            "--network",
            "nat",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "1.1.1.1/32:53",
            "--ttl",
            "10m",
            "--idle-timeout",
            "30",
            "--label",
            "k=v=w",
            "--volume",
            "/a:/b",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(a.tag.as_str(), "py");
        assert_eq!(a.n, 3);
        assert_eq!(a.resources.memory_limit_mib, Some(512));
        assert_eq!(a.resources.cpu_quota, Some(0.5));
        assert_eq!(a.pids_limit, Some(64));
        assert_eq!(a.resources.network, Some(Network::Nat));
        assert_eq!(a.allow.len(), 2);
        assert_eq!(a.resources.ttl, Some(600));
        assert_eq!(a.resources.idle_timeout, Some(30));
        assert_eq!(a.resources.labels, vec![("k".into(), "v=w".into())]);
        assert_eq!(a.resources.volumes, vec!["/a:/b"]);

        let Command::Fork(a) = ok(&["spawn", "-t", "py", "--quiet"]).command else { panic!() };
        assert_eq!(a.n, 1);
        assert!(a.quiet);
        usage_error(&["fork"]);
        usage_error(&["fork", "--tag", "py", "-n", "0"]);
        usage_error(&["fork", "--tag", "py", "-n", "1001"]);
        usage_error(&["fork", "--tag", "py", "--network", "bridge"]);
        usage_error(&["fork", "--tag", "py", "--cpu-quota", "-1"]);
        usage_error(&["fork", "--tag", "py", "--label", "novalue"]);
        usage_error(&["fork", "--tag", "py", "--volume", "/a:relative"]);
        usage_error(&["fork", "--tag", "py", "--ttl", "soon"]);
        usage_error(&["fork", "--tag", "py", "--quiet", "--json"]);
    }

    #[test]
    fn ls_and_kill() {
        let Command::Ls(a) = ok(&["ls"]).command else { panic!() };
        assert!(a.tag.is_none());
        let Command::Ls(a) = ok(&["ls", "--tag", "py"]).command else { panic!() };
        assert_eq!(a.tag.unwrap().as_str(), "py");

        let Command::Kill(a) = ok(&["kill", "sb-a", "sb-b"]).command else { panic!() };
        assert_eq!(a.ids.len(), 2);
        let Command::Kill(a) = ok(&["kill", "--tag", "py"]).command else { panic!() };
        assert!(a.tag.is_some());
        let Command::Kill(a) = ok(&["kill", "--all"]).command else { panic!() };
        assert!(a.all);
        usage_error(&["kill"]);
        usage_error(&["kill", "sb-a", "--all"]);
        usage_error(&["kill", "--tag", "py", "--all"]);
        usage_error(&["kill", "not-an-id"]);
    }

    #[test]
    fn exec() {
        let Command::Exec(a) =
            ok(&["exec", "sb-a", "--timeout", "5", "-e", "A=1", "--cwd", "/tmp", "-i", "--", "ls", "-la", "--json"])
                .command
        else {
            panic!()
        };
        assert_eq!(a.id.as_str(), "sb-a");
        assert_eq!(a.timeout, Some(5));
        assert_eq!(a.env, vec![("A".into(), "1".into())]);
        assert_eq!(a.cwd.as_deref(), Some("/tmp"));
        assert!(a.stdin);
        assert_eq!(a.command, vec!["ls", "-la", "--json"]);

        // Without --, everything from the command on belongs to it.
        let cli = ok(&["exec", "sb-a", "python3", "-c", "print(1)", "--timeout", "9"]);
        let Command::Exec(a) = cli.command else { panic!() };
        assert_eq!(a.command, vec!["python3", "-c", "print(1)", "--timeout", "9"]);
        assert_eq!(a.timeout, None);
        assert!(!cli.global.json);

        usage_error(&["exec", "sb-a"]);
        usage_error(&["exec", "sb-a", "--"]);
        usage_error(&["exec", "bad", "ls"]);
        usage_error(&["exec", "sb-a", "--env", "=x", "ls"]);
    }

    #[test]
    fn exec_interactive_and_detached() {
        let Command::Exec(a) = ok(&["exec", "-it", "sb-a", "--", "sh"]).command else { panic!() };
        assert!(a.stdin && a.tty && !a.detach);
        assert_eq!(a.command, vec!["sh"]);
        let Command::Exec(a) = ok(&["exec", "sb-a", "-t", "--interactive", "bash", "-l"]).command else { panic!() };
        assert!(a.stdin && a.tty);
        assert_eq!(a.command, vec!["bash", "-l"]);
        let Command::Exec(a) = ok(&["exec", "-d", "--tag", "counter", "sb-a", "--", "sh", "-c", "x"]).command else {
            panic!()
        };
        assert!(a.detach && !a.stdin && !a.tty);
        assert_eq!(a.tag.as_deref(), Some("counter"));
        assert_eq!(a.command, vec!["sh", "-c", "x"]);
        // Flags after the command belong to it.
        let Command::Exec(a) = ok(&["exec", "sb-a", "ls", "-t", "-d"]).command else { panic!() };
        assert!(!a.tty && !a.detach);
        ok(&["exec", "-i", "--tag", "job.1_a-b", "sb-a", "cat"]);
        // A tag names a process: only with -d, -i or -t, and not all digits.
        usage_error(&["exec", "--tag", "x", "sb-a", "ls"]);
        usage_error(&["exec", "-d", "--tag", "123", "sb-a", "ls"]);
        usage_error(&["exec", "-d", "--tag", "-x", "sb-a", "ls"]);
        usage_error(&["exec", "-d", "--tag", "a/b", "sb-a", "ls"]);
        usage_error(&["exec", "-d", "sb-a"]);
    }

    #[test]
    fn processes_and_watch() {
        let Command::Ps(a) = ok(&["ps", "sb-a", "--json"]).command else { panic!() };
        assert_eq!(a.id.as_str(), "sb-a");
        usage_error(&["ps"]);

        let Command::Attach(a) = ok(&["attach", "sb-a", "counter"]).command else { panic!() };
        assert_eq!(a.process, "counter");
        assert!(!a.no_replay);
        let Command::Attach(a) = ok(&["attach", "sb-a", "042", "--no-replay"]).command else { panic!() };
        assert_eq!(a.process, "42");
        assert!(a.no_replay);
        usage_error(&["attach", "sb-a"]);
        usage_error(&["attach", "sb-a", "0"]);
        usage_error(&["attach", "sb-a", "../x"]);

        let Command::Signal(a) = ok(&["signal", "sb-a", "counter", "TERM"]).command else { panic!() };
        assert_eq!((a.process.as_str(), a.signal.as_str()), ("counter", "TERM"));
        ok(&["signal", "sb-a", "7", "9"]);
        usage_error(&["signal", "sb-a", "counter"]);

        let Command::Watch(a) = ok(&["watch", "sb-a", "/tmp"]).command else { panic!() };
        assert_eq!(a.path, "/tmp");
        assert!(!a.no_recursive);
        let Command::Watch(a) = ok(&["watch", "sb-a", "/tmp", "--no-recursive"]).command else { panic!() };
        assert!(a.no_recursive);
        usage_error(&["watch", "sb-a", "tmp"]);
        usage_error(&["watch", "sb-a"]);
    }

    #[test]
    fn global_timeout_is_separate_from_exec_timeout() {
        let cli = ok(&["--timeout", "30s", "exec", "sb-a", "--timeout", "5", "true"]);
        assert_eq!(cli.global.rpc_timeout, Some(std::time::Duration::from_secs(30)));
        let Command::Exec(a) = cli.command else { panic!() };
        assert_eq!(a.timeout, Some(5));
    }

    #[test]
    fn eval_and_ping() {
        let Command::Eval(a) = ok(&["eval", "sb-a", "1 + 1"]).command else { panic!() };
        assert_eq!(a.code, "1 + 1");
        let Command::Eval(a) = ok(&["eval", "sb-a", "-"]).command else { panic!() };
        assert_eq!(a.code, "-");
        let Command::Eval(a) = ok(&["eval", "sb-a", "-1"]).command else { panic!() };
        assert_eq!(a.code, "-1");
        usage_error(&["eval", "sb-a"]);

        let Command::Ping(a) = ok(&["ping", "sb-a"]).command else { panic!() };
        assert_eq!(a.id.as_str(), "sb-a");
        usage_error(&["ping"]);
    }

    #[test]
    fn workspace() {
        let Command::Workspace(WorkspaceCommand::Create(a)) = ok(&[
            "workspace",
            "create",
            "dev",
            "--tag",
            "py",
            "--memory-limit-mib",
            "1024",
            "--network",
            "none",
            "--ttl",
            "1h",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(a.name.as_str(), "dev");
        assert_eq!(a.tag.as_str(), "py");
        assert_eq!(a.resources.memory_limit_mib, Some(1024));
        assert_eq!(a.resources.ttl, Some(3600));
        for (sub, alias) in [("get", None), ("suspend", None), ("resume", None), ("delete", Some("rm"))] {
            ok(&["workspace", sub, "dev"]);
            ok(&["ws", sub, "dev"]);
            if let Some(alias) = alias {
                ok(&["ws", alias, "dev"]);
            }
            usage_error(&["workspace", sub]);
            usage_error(&["workspace", sub, "bad.name"]);
        }
        assert!(matches!(ok(&["workspace", "list", "--json"]).command, Command::Workspace(WorkspaceCommand::List)));
        ok(&["ws", "ls"]);
        usage_error(&["workspace"]);
        usage_error(&["workspace", "create", "dev"]);
    }

    #[test]
    fn image_store() {
        assert!(matches!(ok(&["image", "ls", "--json"]).command, Command::Image(ImageCommand::Ls)));
        ok(&["image", "list"]);
        let Command::Image(ImageCommand::Inspect(a)) = ok(&["image", "inspect", "sha256:3f2a"]).command else {
            panic!()
        };
        assert_eq!(a.image, "sha256:3f2a");
        let Command::Image(ImageCommand::Rm(a)) = ok(&["image", "rm", "team/app:1", "python"]).command else {
            panic!()
        };
        assert_eq!(a.images, vec!["team/app:1", "python"]);
        usage_error(&["image", "rm"]);
        usage_error(&["image", "inspect", "sha256:XYZ"]);
        usage_error(&["image", "inspect", "../etc"]);
        usage_error(&["image"]);

        let Command::Image(ImageCommand::Import(a)) =
            ok(&["image", "import", "./layout", "--name", "team/app:1", "--ref", "app:2", "--allow-devices"]).command
        else {
            panic!()
        };
        assert_eq!(a.path, PathBuf::from("./layout"));
        assert_eq!(a.name.as_deref(), Some("team/app:1"));
        assert_eq!(a.reference.as_deref(), Some("app:2"));
        assert!(a.allow_devices);
        usage_error(&["image", "import"]);
        usage_error(&["image", "import", "x.tar", "--name", "sha256:00"]);
        usage_error(&["image", "import", "x.tar", "--name", "a b"]);

        let Command::Image(ImageCommand::Pull(a)) =
            ok(&["image", "pull", "localhost:5000/team/app:1", "--name", "app"]).command
        else {
            panic!()
        };
        assert_eq!((a.reference.as_str(), a.name.as_deref()), ("localhost:5000/team/app:1", Some("app")));
        usage_error(&["image", "pull", "two words"]);

        let Command::Image(ImageCommand::Build(a)) = ok(&[
            "image",
            "build",
            "py-req",
            "--from",
            "minimal",
            "--apt",
            "curl",
            "--apt",
            "jq",
            "--pip",
            "numpy==2.1",
            "--run",
            "mkdir -p /data",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(a.name, "py-req");
        assert_eq!(a.from.as_deref(), Some("minimal"));
        assert_eq!(a.steps.apt, vec!["curl", "jq"]);
        assert_eq!(a.steps.pip, vec!["numpy==2.1"]);
        assert_eq!(a.steps.run, vec!["mkdir -p /data"]);
        let Command::Image(ImageCommand::Build(a)) = ok(&["image", "build", "plain"]).command else { panic!() };
        assert!(a.from.is_none() && a.steps.is_empty());
        usage_error(&["image", "build"]);
        usage_error(&["image", "build", "x", "--apt", "-y"]);
        usage_error(&["image", "build", "x", "--pip", "a b"]);
        usage_error(&["image", "build", "x", "--run", ""]);
    }

    #[test]
    fn parent_build() {
        let Command::Parent(ParentCommand::Build(a)) =
            ok(&["parent", "build", "python", "--extra", "curl", "--apt", "jq", "--pip", "requests"]).command
        else {
            panic!()
        };
        assert_eq!(a.image, "python");
        assert_eq!(a.apt, vec!["curl", "jq"], "--extra is --apt");
        assert_eq!(a.steps().pip, vec!["requests"]);
        let Command::Parent(ParentCommand::Build(a)) =
            ok(&["parent", "build", "tools", "--from", "minimal", "--apt", "jq"]).command
        else {
            panic!()
        };
        assert_eq!((a.image.as_str(), a.from.as_deref()), ("tools", Some("minimal")));
        let Command::Parent(ParentCommand::Build(a)) =
            ok(&["parent", "build", "./app.tar", "--name", "app", "--ref", "app:1"]).command
        else {
            panic!()
        };
        assert_eq!((a.name.as_deref(), a.reference.as_deref()), (Some("app"), Some("app:1")));
        usage_error(&["parent", "build"]);
        usage_error(&["parent", "build", "x", "--from", "python", "--name", "y"]);
        usage_error(&["parent"]);
    }

    #[test]
    fn from_image_and_run() {
        let Command::FromImage(a) =
            ok(&["from-image", "localhost:5000/app:1", "--tag", "app", "--mem-mib", "512", "--vcpus", "2"]).command
        else {
            panic!()
        };
        assert_eq!(a.image, "localhost:5000/app:1");
        assert_eq!((a.tag.as_str(), a.mem_mib, a.vcpus), ("app", Some(512), Some(2)));
        usage_error(&["from-image", "python"]);
        usage_error(&["from-image", "python", "--tag", "a/b"]);
        usage_error(&["from-image", "--tag", "x"]);

        let Command::Run(a) = ok(&[
            "run",
            "--image",
            "python",
            "--pip",
            "requests",
            "--apt",
            "curl",
            "-e",
            "A=1",
            "--workdir",
            "/srv",
            "--tag",
            "mine",
            "--keep",
            "--timings",
            "--",
            "python3",
            "-c",
            "print(1)",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(a.image, "python");
        assert_eq!((a.apt.as_slice(), a.pip.as_slice()), (&["curl".to_string()][..], &["requests".to_string()][..]));
        assert_eq!(a.env, vec![("A".into(), "1".into())]);
        assert_eq!(a.workdir.as_deref(), Some("/srv"));
        assert_eq!(a.tag.unwrap().as_str(), "mine");
        assert!(a.keep && a.timings);
        assert_eq!(a.command, vec!["python3", "-c", "print(1)"]);

        // Without --, everything from the command on belongs to it.
        let Command::Run(a) = ok(&["run", "--image", "python", "sh", "-c", "exit 3", "--keep"]).command else {
            panic!()
        };
        assert_eq!(a.command, vec!["sh", "-c", "exit 3", "--keep"]);
        assert!(!a.keep && !a.timings && a.tag.is_none());
        usage_error(&["run", "--image", "python"]);
        usage_error(&["run", "--", "true"]);
        usage_error(&["run", "--image", "", "--", "true"]);
        usage_error(&["run", "--image", "python", "--workdir", "rel", "--", "true"]);
        usage_error(&["run", "--image", "python", "--mem-mib", "0", "--", "true"]);
    }

    #[test]
    fn image_names_and_refs() {
        assert_eq!(parse_image_name("localhost:5000/team/app:1"), Ok("localhost:5000/team/app:1".into()));
        assert_eq!(parse_image_name("app@sha256:ab+x"), Ok("app@sha256:ab+x".into()));
        for bad in ["", "-x", "/abs", "a b", "a/../b", "sha256:00", &"a".repeat(256)] {
            assert!(parse_image_name(bad).is_err(), "{bad:?}");
        }
        assert!(parse_image_ref(&format!("sha256:{}", "0".repeat(64))).is_ok());
        assert!(parse_image_ref(&format!("sha256:{}", "0".repeat(65))).is_err());
        assert!(parse_image_ref("sha256:").is_err());
        assert!(parse_image_ref("python").is_ok());
        assert!(parse_package("numpy>=2,<3").is_ok());
        assert!(parse_package("--index-url").is_err());
        assert!(parse_nonempty("a\nb").is_err());
        assert!(parse_nonempty(" ").is_err());
    }

    #[test]
    fn completions() {
        for shell in ["bash", "zsh", "fish"] {
            let Command::Completions(_) = ok(&["completions", shell]).command else { panic!() };
        }
        usage_error(&["completions", "cmd.exe"]);
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_secs("90"), Ok(90));
        assert_eq!(parse_secs("2m"), Ok(120));
        assert_eq!(parse_secs("1h 30m"), Ok(5400));
        assert!(parse_secs("1.5").is_err());
        assert!(parse_secs("-3").is_err());
        assert_eq!(parse_duration("0.25"), Ok(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration("500ms"), Ok(std::time::Duration::from_millis(500)));
        assert!(parse_duration("nan").is_err());
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=a").is_err());
        assert_eq!(parse_image("python"), Ok("python".into()));
        assert_eq!(parse_image("/x/y.img"), Ok("/x/y.img".into()));
        assert_eq!(parse_image("team/app:1"), Ok("team/app:1".into()), "an image name, not a path");
        assert!(parse_image("./y.img").unwrap().starts_with('/'));
        assert!(parse_image("").is_err());
        assert_eq!(parse_volume("/h:/g:rw"), Ok("/h:/g:rw".into()));
        assert!(parse_volume("/h").is_err());
        assert!(parse_volume(":/g").is_err());
        assert!(parse_volume("/h:/g:rx").is_err());
        assert!(parse_volume("/h:/g:ro:x").is_err());
        assert!(parse_volume("h:/g").unwrap().starts_with('/'));
    }
}
