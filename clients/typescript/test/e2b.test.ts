// E2B's own JavaScript SDK (`e2b`, pinned in package.json), unchanged, against
// a real forkd daemon and real microVMs, configured only with its documented
// environment variables (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). A
// template is a forkd snapshot tag. Runs only with FORKD_E2E=1.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
  AuthenticationError,
  CommandExitError,
  FileType,
  NotFoundError,
  Sandbox,
  type FilesystemEvent,
} from "e2b";

import { Daemon, E2E, bakeE2E } from "./daemon.js";

const TEMPLATE = "e2b-ts";
const text = (b: Uint8Array) => new TextDecoder().decode(b);

async function until(what: string, check: () => boolean, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`${what} did not happen within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("e2b sdk", { skip: E2E ? false : "needs microVMs: set FORKD_E2E=1" }, () => {
  let d: Daemon;

  before(async () => {
    d = await Daemon.start();
    await bakeE2E(d, TEMPLATE);
    process.env.E2B_API_URL = `${d.url}/e2b`;
    process.env.E2B_SANDBOX_URL = d.url;
    process.env.E2B_API_KEY = d.token;
    delete process.env.E2B_DOMAIN;
    delete process.env.E2B_DEBUG;
  });

  after(async () => {
    await d?.stop();
  });

  it("runs commands, a PTY and file calls", async () => {
    const sbx = await Sandbox.create(TEMPLATE, { timeoutMs: 600_000, metadata: { suite: "ts" } });
    try {
      const r = await sbx.commands.run("echo hello; echo oops >&2");
      assert.deepEqual([r.exitCode, r.stdout, r.stderr], [0, "hello\n", "oops\n"]);

      let streamed = "";
      await sbx.commands.run("for i in 1 2 3; do echo line$i; done", { onStdout: (s) => void (streamed += s) });
      assert.equal(streamed, "line1\nline2\nline3\n");

      await assert.rejects(sbx.commands.run("echo bad >&2; exit 3"), (e: unknown) => {
        assert.ok(e instanceof CommandExitError);
        assert.equal(e.exitCode, 3);
        assert.equal(e.stderr, "bad\n");
        return true;
      });

      const h = await sbx.commands.run("read line; echo got:$line", { background: true, stdin: true });
      assert.ok((await sbx.commands.list()).some((p) => p.pid === h.pid));
      await sbx.commands.sendStdin(h.pid, "abc\n");
      assert.equal((await h.wait()).stdout, "got:abc\n");
      const sleeper = await sbx.commands.run("sleep 600", { background: true });
      assert.equal(await sbx.commands.kill(sleeper.pid), true);
      assert.equal(await sbx.commands.kill(999999), false);

      let screen = "";
      const pty = await sbx.pty.create({ cols: 80, rows: 24, timeoutMs: 0, onData: (b) => void (screen += text(b)) });
      await sbx.pty.sendInput(pty.pid, new TextEncoder().encode("stty size; echo MARK$((1))\n"));
      await until("the first mark", () => screen.includes("MARK1\r\n"));
      assert.ok(screen.includes("24 80"), screen);
      await sbx.pty.resize(pty.pid, { cols: 100, rows: 30 });
      await sbx.pty.sendInput(pty.pid, new TextEncoder().encode("stty size; echo MARK$((2))\n"));
      await until("the second mark", () => screen.includes("MARK2\r\n"));
      assert.ok(screen.includes("30 100"), screen);
      assert.equal(await sbx.pty.kill(pty.pid), true);

      const info = await sbx.files.write("/tmp/ts/a.txt", "alpha");
      assert.equal(info.path, "/tmp/ts/a.txt");
      assert.equal(await sbx.files.read("/tmp/ts/a.txt"), "alpha");
      assert.equal(await sbx.files.exists("/tmp/ts/a.txt"), true);
      assert.equal(await sbx.files.exists("/tmp/ts/nope"), false);
      const st = await sbx.files.getInfo("/tmp/ts/a.txt");
      assert.deepEqual([st.name, st.type, st.size], ["a.txt", FileType.FILE, 5]);
      assert.equal(await sbx.files.makeDir("/tmp/ts/sub"), true);
      assert.equal(await sbx.files.makeDir("/tmp/ts/sub"), false);
      assert.deepEqual((await sbx.files.list("/tmp/ts")).map((e) => e.name).sort(), ["a.txt", "sub"]);
      assert.equal((await sbx.files.rename("/tmp/ts/a.txt", "/tmp/ts/b.txt")).path, "/tmp/ts/b.txt");
      await sbx.files.remove("/tmp/ts/sub");
      assert.equal(await sbx.files.exists("/tmp/ts/sub"), false);
      await assert.rejects(sbx.files.read("/tmp/ts/missing"), NotFoundError);

      const events: FilesystemEvent[] = [];
      const w = await sbx.files.watchDir("/tmp/ts", (e) => void events.push(e), { timeoutMs: 0 });
      await sbx.files.write("/tmp/ts/watched.txt", "x");
      await until("a watch event", () => events.some((e) => e.name === "watched.txt"));
      await w.stop();
    } finally {
      await sbx.kill();
    }
  });

  it("times out, lists, pauses, resumes, snapshots and kills", async () => {
    const sbx = await Sandbox.create(TEMPLATE, { timeoutMs: 600_000, metadata: { suite: "ts-life" } });
    try {
      assert.equal(await sbx.isRunning(), true);
      await sbx.setTimeout(900_000);
      const info = await sbx.getInfo();
      assert.equal(info.sandboxId, sbx.sandboxId);
      assert.deepEqual(info.metadata, { suite: "ts-life" });
      const listed = await Sandbox.list({ query: { metadata: { suite: "ts-life" } } }).nextItems();
      assert.deepEqual(
        listed.map((s) => s.sandboxId),
        [sbx.sandboxId],
      );
      const [m] = await sbx.getMetrics();
      assert.ok(m && m.cpuCount >= 1 && m.memUsed > 0 && m.memUsed < m.memTotal && m.diskTotal > 0, JSON.stringify(m));
      const again = await Sandbox.connect(sbx.sandboxId);
      assert.equal((await again.commands.run("echo via-connect")).stdout, "via-connect\n");

      await sbx.files.write("/root/keep.txt", "kept");
      const bg = await sbx.commands.run("sleep 1000", { background: true });
      assert.equal(await sbx.pause(), true);
      assert.equal(await sbx.isRunning(), false);
      const resumed = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 600_000 });
      assert.equal(await resumed.files.read("/root/keep.txt"), "kept");
      assert.ok((await resumed.commands.list()).some((p) => p.pid === bg.pid));

      const snap = await resumed.createSnapshot();
      const child = await Sandbox.create(snap.snapshotId, { timeoutMs: 300_000 });
      try {
        assert.equal(await child.files.read("/root/keep.txt"), "kept");
      } finally {
        await child.kill();
      }
    } finally {
      assert.equal(await sbx.kill(), true);
    }
    assert.equal(await sbx.isRunning(), false);
    assert.equal(await sbx.kill(), false);
  });

  it("answers unknown sandboxes and wrong keys as the SDK expects", async () => {
    await assert.rejects(Sandbox.connect("inosuchsandbox000000"), NotFoundError);
    const saved = process.env.E2B_API_KEY;
    process.env.E2B_API_KEY = "wrong-key-wrong-key-wrong-key";
    try {
      await assert.rejects(Sandbox.list().nextItems(), AuthenticationError);
    } finally {
      process.env.E2B_API_KEY = saved;
    }
  });
});
