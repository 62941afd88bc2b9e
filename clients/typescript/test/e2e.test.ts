// The sandbox life cycle against real microVMs: fork, exec, streaming exec,
// eval, files, branch, kill. Runs only with FORKD_E2E=1 (guest assets needed).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
  Client,
  CommandError,
  ConflictError,
  ForkdError,
  InvalidArgumentError,
  NotFoundError,
  type FileEvent,
  type ProcessChunk,
  type SnapshotInfo,
} from "../src/index.js";
import { Daemon, E2E, E2E_TAG, bakeE2E } from "./daemon.js";

const text = (b: Uint8Array) => new TextDecoder().decode(b);

/** Prints "tick 0", "tick 1", ... five times a second until stopped. */
const COUNTER = 'i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.2; done';

/** Output (and the streams it came on) up to the chunk holding `needle`; the
 * process's own timeout ends the stream if it never comes. Breaking out
 * leaves the stream open for more. */
async function readUntil(chunks: AsyncIterable<ProcessChunk>, needle: string): Promise<{ seen: string; kinds: Set<string> }> {
  let seen = "";
  const kinds = new Set<string>();
  for await (const { stream, data } of chunks) {
    seen += text(data);
    kinds.add(stream);
    if (seen.includes(needle)) return { seen, kinds };
  }
  throw new Error(`${JSON.stringify(needle)} never arrived; got ${JSON.stringify(seen)}`);
}

/** [kind, path] of each event up to the one `done` accepts, repeats in a row folded. */
async function eventsUntil(events: AsyncIterable<FileEvent>, done: (e: FileEvent) => boolean): Promise<[string, string][]> {
  const out: [string, string][] = [];
  for await (const e of events) {
    const last = out[out.length - 1];
    if (!last || last[0] !== e.kind || last[1] !== e.path) out.push([e.kind, e.path]);
    if (done(e)) return out;
  }
  throw new Error(`the watch ended early: ${JSON.stringify(out)}`);
}

describe("e2e", { skip: E2E ? false : "needs microVMs: set FORKD_E2E=1" }, () => {
  let d: Daemon;
  let c: Client;
  let snap: SnapshotInfo;
  before(async () => {
    d = await Daemon.start();
    c = d.client();
    snap = await bakeE2E(d);
  });
  after(async () => {
    await d?.stop();
  });

  it("created a ready base snapshot", async () => {
    assert.equal(snap.status, "ready");
    assert.equal(snap.kind, "base");
    assert.equal((await c.snapshots.get(E2E_TAG)).tag, E2E_TAG);
  });

  it("forks children with their own identity and kills them", async () => {
    let ids: string[] = [];
    await c.withSandboxes(E2E_TAG, { n: 2, labels: { suite: "ts" } }, async (sbs) => {
      assert.equal(sbs.length, 2);
      ids = sbs.map((s) => s.id);
      assert.equal(new Set(ids).size, 2);
      for (const sb of sbs) {
        assert.equal(sb.info.status, "running");
        assert.deepEqual(sb.info.labels, { suite: "ts" });
        const r = await sb.exec(["hostname"]);
        assert.ok(r.ok, JSON.stringify(r));
        assert.equal(r.stdout.trim(), sb.info.hostname);
      }
      const listed = (await c.sandboxes.list(E2E_TAG)).map((s) => s.id);
      for (const id of ids) assert.ok(listed.includes(id));
    });
    for (const id of ids) await assert.rejects(c.sandboxes.get(id), NotFoundError);
  });

  it("keeps a hot pool that forks take from", async () => {
    const pool = await c.snapshots.setPool(E2E_TAG, 1);
    assert.deepEqual([pool.tag, pool.target, pool.network], [E2E_TAG, 1, "none"]);
    const deadline = Date.now() + 120_000;
    while ((await c.snapshots.pools()).find((p) => p.tag === E2E_TAG)?.ready !== 1) {
      assert.ok(Date.now() < deadline, "the pool did not fill");
      await new Promise((r) => setTimeout(r, 200));
    }
    try {
      await c.withSandbox(E2E_TAG, async (sb) => {
        assert.equal(sb.info.spawnPhases?.pooled, true);
        assert.equal((await sb.exec(["hostname"])).stdout.trim(), sb.info.hostname);
      });
    } finally {
      await c.snapshots.setPool(E2E_TAG, 0);
    }
    await assert.rejects(c.snapshots.setPool(E2E_TAG, 1, { network: "bridge" as "nat" }), InvalidArgumentError);
    assert.ok((await c.snapshots.pools()).every((p) => p.target === 0));
  });

  it("runs commands with env, cwd, stdin and timeouts", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const r = await sb.exec("echo out; echo err >&2; exit 7");
      assert.deepEqual([r.stdout, r.stderr, r.exitCode, r.ok], ["out\n", "err\n", 7, false]);
      await assert.rejects(sb.exec("exit 7", { check: true }), (e: unknown) => e instanceof CommandError && /exited with 7/.test(e.message));
      const r2 = await sb.exec(["sh", "-c", 'echo "$GREETING"; pwd; cat'], { env: { GREETING: "hello" }, cwd: "/tmp", stdin: "piped" });
      assert.equal(r2.stdout, "hello\n/tmp\npiped");
      const r3 = await sb.exec(["sleep", "30"], { timeout: 1 });
      assert.ok(r3.timedOut && !r3.ok);
      assert.ok((await sb.ping()).ok);
    });
  });

  it("streams output as it arrives", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      // stdout and stderr are separate pipes: order across them is only
      // guaranteed with time between the writes.
      const stream = sb.execStream("echo first; sleep 3; echo second >&2; sleep 1; echo third");
      const start = Date.now();
      const seen: [string, string, number][] = [];
      for await (const { stream: s, data } of stream) seen.push([s, text(data), Date.now() - start]);
      assert.deepEqual(
        seen.map(([s, t]) => [s, t]),
        [["stdout", "first\n"], ["stderr", "second\n"], ["stdout", "third\n"]],
      );
      // "first" arrived while the command was still sleeping.
      assert.ok(seen[0]![2] < seen[1]![2] - 2000, JSON.stringify(seen));
      assert.equal(stream.result?.exitCode, 0);
      assert.equal(stream.result?.stdout, "first\nthird\n");
      assert.equal((await sb.execStream("exit 3").wait()).exitCode, 3);
    });
  });

  it("evaluates Python in the warm interpreter", async (t) => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      if (snap.runtime !== "python") {
        const r = await sb.eval("1 + 1");
        assert.ok(!r.ok && r.error);
        t.skip(`image ${snap.image} has no warm Python runtime`);
        return;
      }
      assert.ok((await sb.eval("x = 41")).ok);
      const r = await sb.eval("x + 1");
      assert.ok(r.ok && r.result === "42", JSON.stringify(r));
      const bad = await sb.eval("1 / 0");
      assert.ok(!bad.ok && bad.error.includes("ZeroDivisionError"));
      await assert.rejects(sb.eval("1 / 0", { check: true }), CommandError);
    });
  });

  it("moves files in and out", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const blob = new Uint8Array(2_500_000).map((_, i) => i % 251);
      const info = await sb.files.write("/tmp/blob.bin", blob, 0o600);
      assert.equal(info.size, BigInt(blob.length));
      assert.match(info.digest, /^sha256:/);
      assert.deepEqual(await sb.files.read("/tmp/blob.bin"), blob);
      await sb.files.write("/tmp/note.txt", "héllo");
      assert.equal(await sb.files.readText("/tmp/note.txt"), "héllo");
      const names = (await sb.files.list("/tmp")).map((f) => f.name);
      assert.ok(names.includes("blob.bin") && names.includes("note.txt"), names.join(","));
      const st = await sb.files.stat("/tmp/blob.bin");
      assert.equal(st.mode & 0o777, 0o600);
      await sb.files.remove("/tmp/note.txt");
      assert.equal(await sb.files.exists("/tmp/note.txt"), false);
      await assert.rejects(sb.files.read("/tmp/note.txt"), NotFoundError);
      await assert.rejects(sb.files.read("relative"), InvalidArgumentError);
    });
  });

  it("branches a running sandbox and forks from the branch", async () => {
    const tag = "ts-branch";
    await c.withSandbox(E2E_TAG, async (sb) => {
      await sb.files.write("/tmp/state", "from the parent");
      const b = await sb.branch({ tag });
      assert.deepEqual([b.tag, b.status, b.kind, b.parentTag], [tag, "ready", "diff", E2E_TAG]);
      assert.ok((await sb.exec(["true"])).ok);
    });
    try {
      await c.withSandboxes(tag, { n: 2 }, async (children) => {
        for (const child of children) assert.equal(await child.files.readText("/tmp/state"), "from the parent");
      });
      await assert.rejects(c.snapshots.delete(E2E_TAG), ConflictError);
    } finally {
      assert.deepEqual((await c.snapshots.delete(tag)).deleted, [tag]);
    }
  });

  it("kills sandboxes", async () => {
    const sb = await c.sandbox(E2E_TAG);
    assert.equal((await sb.refresh()).status, "running");
    await sb.kill();
    await sb.kill(); // idempotent
    await assert.rejects(sb.refresh(), NotFoundError);
    const group = await c.fork(E2E_TAG, { n: 2 });
    assert.deepEqual((await c.sandboxes.kill({ snapshotTag: E2E_TAG })).sort(), group.map((s) => s.id).sort());
  });

  it("renews a sandbox's TTL", async () => {
    await c.withSandbox(
      E2E_TAG,
      async (sb) => {
        assert.equal(sb.info.ttlSecs, 300);
        const first = sb.info.expiresAtUnix;
        assert.ok(first > 0n);
        const info = await sb.renew(600);
        assert.equal(info.ttlSecs, 600);
        assert.ok(info.expiresAtUnix >= first + 299n);
        assert.equal(sb.info, info);
        assert.equal((await sb.renew(0)).expiresAtUnix, 0n);
      },
      { ttlSecs: 300 },
    );
  });

  it("runs detached processes: list, attach, signal", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const p = await sb.startProcess(COUNTER, { tag: "counter", timeout: 120 });
      assert.deepEqual([p.tag, p.args, p.running, p.pty, p.exit], ["counter", ["sh", "-c", COUNTER], true, false, undefined]);
      assert.ok(p.pid > 1 && p.startedUnixMs > 0);
      const listed = (await sb.processes()).find((q) => q.tag === "counter");
      assert.ok(listed?.running && listed.pid === p.pid);
      await assert.rejects(sb.startProcess(["true"], { tag: "counter" }), ConflictError);

      const stream = sb.attach("counter");
      const { seen, kinds } = await readUntil(stream, "tick 3\n");
      assert.ok(seen.startsWith("tick 0\ntick 1\n"), seen);
      assert.deepEqual([...kinds], ["stdout"]);
      assert.equal(stream.pid, p.pid);
      assert.equal(stream.dropped, 0);
      await sb.signal("counter", "TERM");
      const r = await stream.wait();
      assert.deepEqual([r.exitCode, r.signal, r.ok], [-1, 15, false]);
      assert.ok(r.stdout.startsWith("tick 0\ntick 1\ntick 2\ntick 3\n"), r.stdout);

      const gone = (await sb.processes()).find((q) => q.pid === p.pid)!;
      assert.ok(!gone.running && gone.exit?.signal === 15);
      assert.equal(gone.outputBytes, new TextEncoder().encode(r.stdout).length);
      assert.equal((await sb.attach(p.pid).wait()).stdout, r.stdout);
      assert.equal((await sb.attach(gone, { fromOffset: gone.outputBytes }).wait()).stdout, "");
      await assert.rejects(sb.signal("no-such-process", "TERM"), NotFoundError);
      await assert.rejects(sb.signal(p, "NOT-A-SIGNAL"), InvalidArgumentError);
    });
  });

  it("keeps the last MiB of a process's output", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const p = await sb.startProcess("head -c 1500000 /dev/zero | tr '\\0' x; echo end", { timeout: 60 });
      await sb.attach(p).wait(); // until it has exited
      const total = 1500000 + "end\n".length;
      const replay = sb.attach(p);
      const r = await replay.wait();
      assert.equal(replay.info?.outputBytes, total);
      assert.deepEqual([replay.dropped, r.stdout.length], [total - (1 << 20), 1 << 20]);
      const tail = sb.attach(p, { fromOffset: total - 6 });
      assert.deepEqual([(await tail.wait()).stdout, tail.dropped], ["xxend\n", 0]);
    });
  });

  it("feeds and closes a process's stdin", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const head = await sb.startProcess(["head", "-n", "2"], { stdin: true, timeout: 60 });
      assert.ok(head.stdinOpen);
      await sb.sendStdin(head, "one\n");
      await sb.sendStdin(head, new TextEncoder().encode("two\n"));
      const r = await sb.attach(head).wait();
      assert.deepEqual([r.exitCode, r.stdout, r.stderr], [0, "one\ntwo\n", ""]);

      await sb.startProcess(["cat"], { stdin: true, tag: "cat", timeout: 60 });
      await sb.sendStdin("cat", "no newline");
      assert.equal((await sb.closeStdin("cat")).stdinOpen, false);
      const rc = await sb.attach("cat").wait();
      assert.deepEqual([rc.exitCode, rc.stdout], [0, "no newline"]);

      const wc = await sb.startProcess(["wc", "-c"], { stdin: true, timeout: 60 });
      const big = new Uint8Array(3 * (1 << 20) + 11).fill(120); // several SendStdin calls
      await sb.sendStdin(wc, big, { close: true });
      assert.equal((await sb.attach(wc).wait()).stdout.trim(), String(big.length));
    });
  });

  it("runs a process on a PTY and resizes it", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const p = await sb.startProcess(["sh", "-c", "stty size; read line; stty size"], { pty: { rows: 24, cols: 80 }, tag: "tty", timeout: 60 });
      assert.ok(p.pty && p.stdinOpen);
      const stream = sb.attach("tty");
      const { kinds } = await readUntil(stream, "24 80");
      assert.deepEqual([...kinds], ["pty"]);
      assert.ok((await sb.resize("tty", 40, 120)).pty);
      await sb.sendStdin("tty", "\n");
      const r = await stream.wait();
      assert.ok(r.exitCode === 0 && r.stdout.includes("40 120"), JSON.stringify(r));
    });
  });

  it("talks to an interactive shell on a PTY", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const term = await sb.execInteractive(["sh"], { pty: { rows: 24, cols: 80 }, tag: "shell", timeout: 120 });
      try {
        assert.ok(term.info?.pty && term.info.tag === "shell" && term.pid);
        assert.deepEqual((await sb.processes()).filter((q) => q.tag === "shell").map((q) => q.pid), [term.pid]);
        term.send("stty size\n");
        await readUntil(term, "24 80");
        term.resize(50, 132);
        term.send("stty size\n");
        await readUntil(term, "50 132");
        term.send("exit 3\n");
        const r = await term.wait();
        assert.ok(r.exitCode === 3 && r.stdout.includes("50 132"), JSON.stringify(r));
        assert.throws(() => term.send("too late\n"), (e: unknown) => e instanceof ForkdError && /exited/.test(e.message));
      } finally {
        term.close();
      }
    });
  });

  it("pipes, signals and detaches interactive commands", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      const cat = await sb.execInteractive(["cat"], { timeout: 60 });
      assert.equal(cat.info?.pty, false);
      cat.send("hello\n");
      assert.deepEqual([...(await readUntil(cat, "hello\n")).kinds], ["stdout"]);
      cat.closeStdin();
      const r = await cat.wait();
      assert.deepEqual([r.exitCode, r.stdout], [0, "hello\n"]);

      const sleeper = await sb.execInteractive(["sleep", "60"], { timeout: 120 });
      sleeper.signal("INT");
      assert.equal((await sleeper.wait()).signal, 2);

      // Closing the handle detaches; the process keeps running.
      const first = await sb.execInteractive(["sh", "-c", "read x; echo got $x"], { tag: "later", timeout: 60 });
      first.close();
      assert.equal(first.result, undefined);
      await sb.sendStdin("later", "it\n");
      assert.equal((await sb.attach("later").wait()).stdout, "got it\n");
    });
  });

  it("watches files", async () => {
    await c.withSandbox(E2E_TAG, async (sb) => {
      await sb.exec("mkdir -p /tmp/w", { check: true });
      const events = await sb.watch("/tmp/w");
      try {
        await sb.exec("echo hi > /tmp/w/a", { check: true });
        assert.deepEqual(await eventsUntil(events, (e) => e.kind === "write"), [
          ["create", "/tmp/w/a"],
          ["write", "/tmp/w/a"],
        ]);
        await sb.exec("mv /tmp/w/a /tmp/w/b && mkdir /tmp/w/d", { check: true });
        const seen: FileEvent[] = [];
        for await (const e of events) {
          seen.push(e);
          if (e.isDir) break;
        }
        assert.deepEqual(seen, [
          { kind: "rename", path: "/tmp/w/b", from: "/tmp/w/a", isDir: false },
          { kind: "create", path: "/tmp/w/d", from: "", isDir: true },
        ]);
        // Directories created under the watch are watched too.
        await sb.exec("echo x > /tmp/w/d/inner && chmod 600 /tmp/w/d/inner && rm /tmp/w/b", { check: true });
        assert.deepEqual(await eventsUntil(events, (e) => e.kind === "remove"), [
          ["create", "/tmp/w/d/inner"],
          ["write", "/tmp/w/d/inner"],
          ["chmod", "/tmp/w/d/inner"],
          ["remove", "/tmp/w/b"],
        ]);
      } finally {
        events.close();
      }
      assert.equal(await events.read(), undefined);
      const flat = await sb.watch("/tmp/w", { recursive: false });
      try {
        await sb.exec("touch /tmp/w/d/deep && touch /tmp/w/top", { check: true });
        assert.deepEqual(await flat.read(), { kind: "create", path: "/tmp/w/top", from: "", isDir: false });
      } finally {
        flat.close();
      }
      await assert.rejects(sb.watch("/tmp/no-such-dir"), NotFoundError);
    });
  });

  it("suspends and resumes a workspace", async () => {
    const name = "tsws";
    let ws = await c.workspaces.create(name, E2E_TAG, { labels: { k: "v" } });
    try {
      assert.deepEqual([ws.status, ws.sourceSnapshotTag, ws.labels], ["running", E2E_TAG, { k: "v" }]);
      const sb = await c.sandboxes.get(ws.liveSandboxId);
      assert.equal(sb.info.workspace, name);
      await sb.files.write("/tmp/keep", "kept across suspend");
      await assert.rejects(c.workspaces.create(name, E2E_TAG), ConflictError);
      ws = await c.workspaces.suspend(name);
      assert.ok(ws.status === "suspended" && ws.stateTag && !ws.liveSandboxId, `${ws.status} ${ws.stateTag} ${ws.liveSandboxId}`);
      await assert.rejects(sb.refresh(), NotFoundError);
      ws = await c.workspaces.resume(name);
      assert.ok(ws.status === "running" && ws.liveSandboxId !== sb.id);
      const resumed = await c.sandboxes.get(ws.liveSandboxId);
      assert.equal(await resumed.files.readText("/tmp/keep"), "kept across suspend");
      assert.deepEqual((await c.workspaces.list()).map((w) => w.name), [name]);
    } finally {
      const gone = await c.workspaces.delete(name);
      assert.ok(gone.deletedSnapshots.includes(ws.stateTag), gone.deletedSnapshots.join());
    }
    await assert.rejects(c.workspaces.get(name), NotFoundError);
    assert.equal((await c.snapshots.get(E2E_TAG)).status, "ready");
  });
});
