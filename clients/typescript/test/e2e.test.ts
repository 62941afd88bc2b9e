// The sandbox life cycle against real microVMs: fork, exec, streaming exec,
// eval, files, branch, kill. Runs only with FORKD_E2E=1 (guest assets needed).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Client, CommandError, ConflictError, InvalidArgumentError, NotFoundError, type SnapshotInfo } from "../src/index.js";
import { Daemon, E2E, E2E_TAG } from "./daemon.js";

const text = (b: Uint8Array) => new TextDecoder().decode(b);

describe("e2e", { skip: E2E ? false : "needs microVMs: set FORKD_E2E=1" }, () => {
  let d: Daemon;
  let c: Client;
  let snap: SnapshotInfo;
  before(async () => {
    d = await Daemon.start();
    c = d.client();
    const timeoutMs = Number(process.env.FORKD_E2E_TIMEOUT ?? "900") * 1000;
    snap = await c.snapshots.create(E2E_TAG, { image: process.env.FORKD_E2E_IMAGE ?? "python", timeoutMs });
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
