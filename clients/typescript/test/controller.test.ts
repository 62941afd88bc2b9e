// Controller, the reference forkd SDK's controller API, against a real
// daemon: its errors and refusals without VMs, then (FORKD_E2E=1) the
// reference's scenario with real microVMs, the same as
// clients/python/tests/test_controller.py replays.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { Code } from "@connectrpc/connect";

import { Client, Controller, ControllerError, ForkdError, type ControllerSandboxInfo, type SnapshotInfo } from "../src/index.js";
import { Daemon, E2E, E2E_TAG, bakeE2E } from "./daemon.js";

const GHOST = "sb-aaaaaaaaaaaa"; // well formed, never issued

const SANDBOX_KEYS = ["id", "snapshot_tag", "netns", "guest_addr", "created_at_unix", "pid", "memory_limit_mib", "has_branched"];

/** Asserts that `p` rejects with a ControllerError of `status`, and returns it. */
async function refused(p: Promise<unknown>, status: number): Promise<ControllerError> {
  let err: unknown;
  await p.then(
    () => assert.fail("expected a ControllerError"),
    (e: unknown) => (err = e),
  );
  assert.ok(err instanceof ControllerError, String(err));
  assert.equal(err.status, status, err.message);
  return err;
}

describe("Controller against a daemon", () => {
  let d: Daemon;
  let ctl: Controller;
  before(async () => {
    d = await Daemon.start();
    ctl = new Controller({ baseUrl: d.url, token: d.token });
  });
  after(async () => {
    await d?.stop();
  });

  it("is caught as the reference's error and as every forkd error", () => {
    const e = new ControllerError(409, { error: "tag taken", code: "ALREADY_EXISTS" }, "http://h/v1/snapshots");
    assert.ok(e instanceof ForkdError && e instanceof Error);
    assert.deepEqual([e.name, e.status, e.code, e.rawMessage, e.url], ["ControllerError", 409, Code.AlreadyExists, "tag taken", "http://h/v1/snapshots"]);
    assert.equal(new ControllerError(500, "boom", "u").rawMessage, "boom");
  });

  it("lists nothing on a fresh daemon", async () => {
    assert.deepEqual(await ctl.listSnapshots(), []);
    assert.deepEqual(await ctl.listSandboxes(), []);
  });

  it("answers 404 for an unknown sandbox", async () => {
    for (const call of [
      () => ctl.getSandbox(GHOST),
      () => ctl.execCommand(GHOST, ["true"]),
      () => ctl.evalCode(GHOST, "1"),
      () => ctl.pingSandbox(GHOST),
      () => ctl.branchSandbox(GHOST, { tag: "never" }),
      () => ctl.branchSandbox(GHOST, { mode: "live", wait: false }), // live is accepted, as diff
    ]) {
      const e = await refused(call(), 404);
      assert.equal(e.code, Code.NotFound);
      assert.deepEqual(e.body, { error: e.rawMessage, code: "NOT_FOUND" });
      assert.ok(e.url.startsWith(`${d.url}/v1/sandboxes/${GHOST}`), e.url);
      assert.match(e.message, /HTTP 404 NOT_FOUND/);
    }
    // As in the REST API, killing a sandbox that is not there succeeds.
    assert.equal((await refused(ctl.killSandbox(GHOST), 404)).method, "DELETE");
  });

  it("keeps the daemon's refusals and their status", async () => {
    const e = await refused(ctl.spawnSandboxes({ snapshotTag: "nope" }), 404);
    assert.deepEqual([e.body, e.url, e.method], [{ error: e.rawMessage, code: "NOT_FOUND" }, `${d.url}/v1/sandboxes`, "POST"]);
    assert.equal((await refused(ctl.deleteSnapshot("nope"), 404)).url, `${d.url}/v1/snapshots/nope`);
    assert.equal((await refused(ctl.spawnSandboxes({ snapshotTag: "../etc" }), 400)).code, Code.InvalidArgument);
    await refused(ctl.spawnSandboxes({ snapshotTag: "ts", n: 0 }), 400);
    await refused(ctl.execCommand("not-an-id", ["true"]), 400);
  });

  it("refuses the reference's options that have no counterpart here", async () => {
    for (const [call, says] of [
      [() => ctl.spawnSandboxes({ snapshotTag: "ts", liveFork: true }), "spawn from the branch"],
      [() => ctl.spawnSandboxes({ snapshotTag: "ts", prewarm: true }), "fork(tag, { n, prewarm: true })"],
    ] as const) {
      const e = await refused(call(), 409);
      assert.equal(e.codeName, "FAILED_PRECONDITION");
      assert.ok(e.rawMessage.includes(says), e.rawMessage);
    }
    assert.throws(() => new Controller({ baseUrl: d.url, fetch: globalThis.fetch }), (e: unknown) => e instanceof ControllerError && e.status === 409);
  });

  it("answers 400 for conflicting branch options", async () => {
    for (const opts of [
      { mode: "full", diff: true },
      { diff: true, measure_diff: true },
      { mode: "diff", measure_diff: true },
      { mode: "live", measure_diff: true },
      { mode: "sideways" },
    ]) {
      await refused(ctl.branchSandbox(GHOST, opts as never), 400);
    }
  });

  it("takes the URL and token from the environment", async () => {
    const saved = { url: process.env.FORKD_URL, token: process.env.FORKD_TOKEN, file: process.env.FORKD_TOKEN_FILE };
    try {
      process.env.FORKD_URL = d.url;
      process.env.FORKD_TOKEN = d.token;
      delete process.env.FORKD_TOKEN_FILE;
      const fromEnv = new Controller();
      assert.equal(fromEnv.baseUrl, d.url);
      assert.deepEqual(await fromEnv.listSandboxes(), []);
      process.env.FORKD_TOKEN = "wrong-but-long-enough-0123456789";
      assert.equal((await refused(new Controller().listSnapshots(), 401)).code, Code.Unauthenticated);
    } finally {
      for (const [k, v] of [["FORKD_URL", saved.url], ["FORKD_TOKEN", saved.token], ["FORKD_TOKEN_FILE", saved.file]] as const) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });

  it("reports a bad URL as a ControllerError", () => {
    assert.throws(() => new Controller({ baseUrl: "http://127.0.0.1:1/v1" }), (e: unknown) => e instanceof ControllerError && /must not have a path/.test(e.message));
  });
});

describe("Controller e2e", { skip: E2E ? false : "needs microVMs: set FORKD_E2E=1" }, () => {
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

  it("replays the reference's scenario", async () => {
    const ctl = new Controller({ baseUrl: d.url, token: d.token, timeoutMs: 300_000 });
    const dataDir = (await c.version()).dataDir; // snapshots are in its snapshots/TAG
    const branches: string[] = [];
    try {
      const base = (await ctl.listSnapshots()).find((s) => s.tag === E2E_TAG)!;
      assert.equal(base.dir, join(dataDir, "snapshots", E2E_TAG));
      assert.ok(existsSync(base.dir));
      assert.ok(base.status === "ready" && base.created_at_unix > 0);
      assert.ok(!("branched_from" in base));

      const children = await ctl.spawnSandboxes({ snapshotTag: E2E_TAG, n: 2 });
      assert.equal(children.length, 2);
      for (const ch of children) {
        assert.deepEqual(Object.keys(ch).sort(), [...SANDBOX_KEYS].sort());
        // No NIC without perChildNetns: no address, no namespace.
        assert.ok(ch.pid && ch.guest_addr === null && ch.netns === null && !ch.has_branched && ch.snapshot_tag === E2E_TAG);
      }
      const [a, b] = children.map((ch: ControllerSandboxInfo) => ch.id) as [string, string];
      assert.notEqual(a, b);
      const listed = (await ctl.listSandboxes()).map((s) => s.id);
      assert.ok(listed.includes(a) && listed.includes(b));
      assert.equal((await ctl.getSandbox(a)).id, a);

      const r = await ctl.execCommand(a, ["sh", "-c", "echo out; echo err >&2; exit 3"], { timeoutSecs: 30 });
      assert.deepEqual(r, { stdout: "out\n", stderr: "err\n", exit_code: 3 });
      const p = await ctl.pingSandbox(b);
      assert.ok(p.pong && p.latency_ms > 0);
      if (snap.runtime === "python") {
        assert.equal(p.runtime_ready, true);
        assert.deepEqual(await ctl.evalCode(a, "6 * 7"), { result: "42", error: null, exit_code: 0 });
        const bad = await ctl.evalCode(a, "1 / 0");
        assert.ok(bad.error?.includes("ZeroDivisionError") && bad.result === "", JSON.stringify(bad));
      } else {
        assert.ok((await ctl.evalCode(a, "6 * 7")).error); // no warm interpreter
      }

      // Branch (diff and the reference's default, full) after writing a
      // marker; a child of each branch sees it.
      assert.equal((await ctl.execCommand(a, ["sh", "-c", "echo from-a > /tmp/marker"])).exit_code, 0);
      const t = Math.floor(Date.now() / 1000);
      const diff = await ctl.branchSandbox(a, { tag: `ctl-diff-${t}`, diff: true });
      branches.push(diff.tag);
      assert.deepEqual([diff.tag, diff.branched_from, diff.status], [`ctl-diff-${t}`, a, "ready"]);
      assert.equal(diff.dir, join(dataDir, "snapshots", diff.tag));
      assert.ok(diff.diff_logical_bytes! > 0 && diff.pause_ms! >= 0 && diff.diff_ms! >= 0);
      const full = await ctl.branchSandbox(a, { tag: `ctl-full-${t}` });
      branches.push(full.tag);
      assert.deepEqual([full.branched_from, full.status], [a, "ready"]);
      // Without mode the branch is full, as in the reference.
      assert.deepEqual(await Promise.all(branches.map(async (tag) => (await c.snapshots.get(tag)).kind)), ["diff", "full"]);
      // The source keeps running.
      assert.equal((await ctl.execCommand(a, ["cat", "/tmp/marker"])).stdout, "from-a\n");
      assert.equal((await ctl.getSandbox(a)).has_branched, true);
      await ctl.killSandbox(a);
      await ctl.killSandbox(b);

      const tags = (await ctl.listSnapshots()).map((s) => s.tag);
      assert.ok(tags.includes(diff.tag) && tags.includes(full.tag));
      for (const tag of [diff.tag, full.tag]) {
        const [g] = await ctl.spawnSandboxes({ snapshotTag: tag });
        assert.equal(g!.snapshot_tag, tag);
        assert.equal((await ctl.execCommand(g!.id, ["cat", "/tmp/marker"])).stdout, "from-a\n");
        await ctl.killSandbox(g!.id);
      }
      const left = (await ctl.listSandboxes()).map((s) => s.id);
      assert.ok(!left.includes(a) && !left.includes(b));

      // Killed is gone: a Controller error, as the reference throws.
      assert.equal((await refused(ctl.execCommand(a, ["true"]), 404)).code, Code.NotFound);

      while (branches.length) {
        await ctl.deleteSnapshot(branches[0]!);
        branches.shift();
      }
      const after = (await ctl.listSnapshots()).map((s) => s.tag);
      assert.ok(after.includes(E2E_TAG) && !after.includes(diff.tag) && !after.includes(full.tag));
    } finally {
      await c.sandboxes.kill({ all: true });
      for (const tag of branches) await c.snapshots.delete(tag, { cascade: true });
    }
  });
});
