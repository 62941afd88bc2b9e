// The client against a real daemon, for everything that needs no VM.

import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import {
  AuthenticationError,
  Client,
  CommandError,
  ConflictError,
  DeadlineExceededError,
  ForkdError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  Sandbox,
  UnavailableError,
  UnimplementedError,
  argv,
  isLoopbackUrl,
  parseUrl,
  processRef,
  ptySize,
  signalArg,
  toForkdError,
} from "../src/index.js";
import { SandboxSchema } from "../src/gen/forkd/v1/common_pb.js";
import { Daemon, TOKEN } from "./daemon.js";

describe("against a daemon", () => {
  let d: Daemon;
  let c: Client;
  before(async () => {
    d = await Daemon.start();
    c = d.client();
  });
  after(async () => {
    await d?.stop();
  });

  it("reports its version", async () => {
    const v = await c.version();
    assert.equal(v.api, "v1");
    assert.equal(v.backend, "qemu");
    assert.ok(["kvm", "tcg"].includes(v.accel), v.accel);
    assert.ok(v.dataDir.endsWith("/data"), v.dataDir);
    assert.equal(v.sandboxes, 0);
  });

  it("lists no snapshots, sandboxes or workspaces on a fresh daemon", async () => {
    assert.deepEqual(await c.snapshots.list(), []);
    assert.deepEqual(await c.snapshots.list("ready"), []);
    assert.deepEqual(await c.sandboxes.list(), []);
    assert.deepEqual(await c.workspaces.list(), []);
    assert.deepEqual(await c.sandboxes.kill({ all: true }), []);
  });

  it("rejects a wrong token with AuthenticationError", async () => {
    const bad = d.client({ token: "wrong-but-long-enough-0123456789" });
    await assert.rejects(bad.snapshots.list(), (e: unknown) => {
      assert.ok(e instanceof AuthenticationError);
      assert.equal(e.code, Code.Unauthenticated);
      assert.equal(e.codeName, "UNAUTHENTICATED");
      assert.match(e.rawMessage, /invalid bearer token/);
      return true;
    });
  });

  it("rejects a missing token with AuthenticationError", async () => {
    const saved = { t: process.env.FORKD_TOKEN, f: process.env.FORKD_TOKEN_FILE };
    delete process.env.FORKD_TOKEN;
    delete process.env.FORKD_TOKEN_FILE;
    try {
      await assert.rejects(new Client({ url: d.url }).version(), AuthenticationError);
    } finally {
      if (saved.t !== undefined) process.env.FORKD_TOKEN = saved.t;
      if (saved.f !== undefined) process.env.FORKD_TOKEN_FILE = saved.f;
    }
  });

  it("maps NOT_FOUND for a missing snapshot", async () => {
    await assert.rejects(c.snapshots.get("nope"), (e: unknown) => {
      assert.ok(e instanceof NotFoundError && e instanceof ForkdError && e instanceof Error);
      assert.equal(e.codeName, "NOT_FOUND");
      assert.equal(e.message, 'NOT_FOUND: snapshot "nope" not found');
      assert.ok(e.cause instanceof ConnectError);
      return true;
    });
  });

  it("maps INVALID_ARGUMENT for a bad tag", async () => {
    await assert.rejects(c.snapshots.create("../etc", { wait: false }), InvalidArgumentError);
    await assert.rejects(c.snapshots.get("../etc"), /invalid tag/);
  });

  it("names what the backend cannot do (FAILED_PRECONDITION)", async () => {
    await assert.rejects(c.fork("py", { liveFork: true }), (e: unknown) => {
      assert.ok(e instanceof ConflictError);
      assert.equal(e.codeName, "FAILED_PRECONDITION");
      assert.match(e.message, /live_fork needs a VMM/);
      return true;
    });
  });

  it("needs a remote for push, pull and listRemote", async () => {
    await assert.rejects(c.snapshots.push("py", "file:///tmp/forkd-push"), /--remote/);
    await assert.rejects(c.snapshots.pull("py"), /--remote/);
    await assert.rejects(c.snapshots.listRemote(), /--remote/);
  });

  it("maps workspace errors", async () => {
    await assert.rejects(c.workspaces.create("w1", "nope"), (e: unknown) => e instanceof NotFoundError && /snapshot "nope"/.test(e.message));
    await assert.rejects(c.workspaces.get("w1"), (e: unknown) => e instanceof NotFoundError && /workspace "w1"/.test(e.message));
    await assert.rejects(c.workspaces.suspend("w1"), NotFoundError);
    await assert.rejects(c.workspaces.get("bad/name"), InvalidArgumentError);
    await assert.rejects(c.workspaces.create("w1", "nope", { network: "bridge" }), (e: unknown) => e instanceof InvalidArgumentError && /network/.test(e.message));
  });

  it("types errors that arrive on a server stream", async () => {
    const it = c.snapshots.export("anything");
    await assert.rejects(
      (async () => {
        for await (const _ of it) {
          assert.fail("no chunk expected");
        }
      })(),
      (e: unknown) => e instanceof NotFoundError && /anything/.test(e.message),
    );
  });

  it("types errors of a client stream", async () => {
    await assert.rejects(
      c.snapshots.import("t", [new Uint8Array([1, 2, 3])]),
      (e: unknown) => e instanceof InvalidArgumentError && /zstd/.test(e.message),
    );
  });

  it("maps NOT_FOUND for forking a missing snapshot", async () => {
    await assert.rejects(c.fork("nope", { n: 2 }), NotFoundError);
    let ran = false;
    await assert.rejects(
      c.withSandbox("nope", async () => {
        ran = true;
      }),
      NotFoundError,
    );
    assert.equal(ran, false);
  });

  it("sends fork options to the daemon", async () => {
    // The daemon refuses these before looking the snapshot up, naming them:
    // proof that each option became its request field.
    await assert.rejects(c.fork("nope", { liveFork: true }), (e: unknown) => e instanceof ConflictError && /live_fork/.test(e.message));
    await assert.rejects(c.fork("nope", { network: "bogus" }), (e: unknown) => e instanceof InvalidArgumentError && /network/.test(e.message));
    await assert.rejects(c.fork("py", { n: 0 }), RangeError);
  });

  it("handles unknown and malformed sandbox ids", async () => {
    await assert.rejects(c.sandboxes.get("sb-aaaaaaaaaaaa"), NotFoundError);
    await assert.rejects(c.sandboxes.get("nope"), InvalidArgumentError);
    const ghost = new Sandbox(c, create(SandboxSchema, { id: "sb-aaaaaaaaaaaa" }));
    await assert.rejects(ghost.renew(60), NotFoundError);
    await assert.rejects(ghost.exec(["true"]), NotFoundError);
    await ghost.kill(); // killing a gone sandbox succeeds
  });

  it("types errors of process and watch calls on an unknown sandbox", async () => {
    const ghost = new Sandbox(c, create(SandboxSchema, { id: "sb-aaaaaaaaaaaa" }));
    await assert.rejects(ghost.startProcess(["sleep", "1"], { tag: "t" }), NotFoundError);
    await assert.rejects(ghost.processes(), NotFoundError);
    await assert.rejects(ghost.attach("t").wait(), NotFoundError);
    await assert.rejects(ghost.signal(1, "TERM"), NotFoundError);
    await assert.rejects(ghost.sendStdin("t", "x", { close: true }), NotFoundError);
    await assert.rejects(ghost.closeStdin("t"), NotFoundError);
    await assert.rejects(ghost.resize("t", 24, 80), NotFoundError);
    await assert.rejects(ghost.execInteractive(["sh"], { pty: { rows: 24, cols: 80 } }), NotFoundError);
    await assert.rejects(ghost.watch("/tmp"), NotFoundError);
  });

  it("reads FORKD_URL and FORKD_TOKEN", async () => {
    const saved = { u: process.env.FORKD_URL, t: process.env.FORKD_TOKEN };
    process.env.FORKD_URL = d.url;
    process.env.FORKD_TOKEN = TOKEN;
    try {
      const env = new Client();
      assert.equal(env.url, d.url);
      assert.equal((await env.version()).api, "v1");
      // An explicit option wins over the environment.
      await assert.rejects(new Client({ token: "another-token-long-enough-12345" }).version(), AuthenticationError);
    } finally {
      for (const [k, v] of [["FORKD_URL", saved.u], ["FORKD_TOKEN", saved.t]] as const) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });

  it("turns a client deadline into DeadlineExceededError", async () => {
    // The event stream never ends by itself; the deadline is what stops it.
    const events = d.client({ timeoutMs: 500 }).sandboxes.events();
    await assert.rejects(
      (async () => {
        for await (const _ of events) {
          // no events without sandboxes
        }
      })(),
      DeadlineExceededError,
    );
  });
});

describe("without a daemon", () => {
  it("reports an unreachable daemon as UnavailableError", async () => {
    const port = await new Promise<number>((res) => {
      const s = createServer();
      s.listen(0, "127.0.0.1", () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => res(p));
      });
    });
    await assert.rejects(new Client({ url: `http://127.0.0.1:${port}`, token: TOKEN, timeoutMs: 10_000 }).version(), UnavailableError);
  });

  it("maps every status code", () => {
    const cases: [Code, new (...a: never[]) => ForkdError][] = [
      [Code.NotFound, NotFoundError],
      [Code.Unauthenticated, AuthenticationError],
      [Code.PermissionDenied, PermissionDeniedError],
      [Code.InvalidArgument, InvalidArgumentError],
      [Code.OutOfRange, InvalidArgumentError],
      [Code.AlreadyExists, ConflictError],
      [Code.FailedPrecondition, ConflictError],
      [Code.Aborted, ConflictError],
      [Code.ResourceExhausted, ResourceExhaustedError],
      [Code.Unimplemented, UnimplementedError],
      [Code.Unavailable, UnavailableError],
      [Code.DeadlineExceeded, DeadlineExceededError],
    ];
    for (const [code, Cls] of cases) {
      const e = toForkdError(new ConnectError("why", code));
      assert.ok(e instanceof Cls, `${Code[code]} -> ${e.constructor.name}`);
      assert.equal(e.name, Cls.name);
      assert.equal(e.rawMessage, "why");
      assert.equal(e.code, code);
    }
    const internal = toForkdError(new ConnectError("boom", Code.Internal));
    assert.equal(internal.constructor, ForkdError);
    assert.equal(internal.codeName, "INTERNAL");
  });

  it("parses URLs", () => {
    assert.deepEqual(parseUrl("http://127.0.0.1:8889"), { baseUrl: "http://127.0.0.1:8889", secure: false });
    assert.deepEqual(parseUrl("127.0.0.1:9000"), { baseUrl: "http://127.0.0.1:9000", secure: false });
    assert.deepEqual(parseUrl("https://forkd.example:8443/"), { baseUrl: "https://forkd.example:8443", secure: true });
    assert.deepEqual(parseUrl("http://[::1]:8889"), { baseUrl: "http://[::1]:8889", secure: false });
    for (const bad of ["", "ftp://h:1", "http://h:1/v1", "http://h:1?x=1"]) {
      assert.throws(() => parseUrl(bad), ForkdError, bad);
    }
  });

  it("knows loopback URLs, the only ones sent the local token file", () => {
    for (const l of ["http://127.0.0.1:8889", "http://localhost:1", "http://[::1]:8889", "http://127.1.2.3:1"]) {
      assert.ok(isLoopbackUrl(l), l);
    }
    for (const r of ["http://10.0.0.1:8889", "https://forkd.forkd.svc:8889", "http://localhost.evil:1"]) {
      assert.ok(!isLoopbackUrl(r), r);
    }
  });

  it("refuses a token file others may read, saying how to fix it", () => {
    const dir = mkdtempSync(join(tmpdir(), "forkd-ts-token-"));
    const file = join(dir, "token");
    writeFileSync(file, TOKEN, { mode: 0o644 });
    chmodSync(file, 0o644);
    const saved = { t: process.env.FORKD_TOKEN, f: process.env.FORKD_TOKEN_FILE };
    delete process.env.FORKD_TOKEN;
    process.env.FORKD_TOKEN_FILE = file;
    try {
      assert.throws(() => new Client({ url: "http://10.1.2.3:1" }), /chmod 600/);
      chmodSync(file, 0o600);
      assert.ok(new Client({ url: "http://10.1.2.3:1" }));
    } finally {
      if (saved.t !== undefined) process.env.FORKD_TOKEN = saved.t;
      if (saved.f !== undefined) process.env.FORKD_TOKEN_FILE = saved.f;
      else delete process.env.FORKD_TOKEN_FILE;
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses a CA for plain http and a missing CA file", () => {
    assert.throws(() => new Client({ url: "http://127.0.0.1:1", caCert: "-----BEGIN CERTIFICATE-----\n" }), /not an https/);
    assert.throws(() => new Client({ url: "https://127.0.0.1:1", caCert: "/nonexistent/ca.pem" }), /CA certificate/);
  });

  it("builds argv", () => {
    assert.deepEqual(argv("echo hi | wc -c"), ["sh", "-c", "echo hi | wc -c"]);
    assert.deepEqual(argv(["ls", "/"]), ["ls", "/"]);
    assert.throws(() => argv([]), TypeError);
  });

  it("checks process arguments before calling the daemon", async () => {
    assert.equal(processRef(42), "42");
    assert.equal(processRef("counter"), "counter");
    assert.equal(processRef({ pid: 7 } as never), "7");
    for (const bad of [0, -1, 1.5]) assert.throws(() => processRef(bad), RangeError, String(bad));
    assert.throws(() => processRef(""), RangeError);
    assert.throws(() => processRef(null as never), TypeError);
    assert.deepEqual(ptySize({ rows: 24, cols: 80 }), { rows: 24, cols: 80 });
    for (const [rows, cols] of [[0, 80], [24, 1001]]) assert.throws(() => ptySize({ rows: rows!, cols: cols! }), RangeError);
    assert.throws(() => ptySize({ rows: 2.5, cols: 80 }), TypeError);
    assert.equal(signalArg(9), "9");
    assert.equal(signalArg(" INT "), "INT");
    for (const bad of [0, 65, 2.5]) assert.throws(() => signalArg(bad), RangeError, String(bad));
    assert.throws(() => signalArg(""), RangeError);

    // A sandbox on an unreachable daemon: every refusal below is local.
    const sb = new Sandbox(new Client({ url: "http://127.0.0.1:1", token: TOKEN }), create(SandboxSchema, { id: "sb-aaaaaaaaaaaa" }));
    await assert.rejects(sb.startProcess([], {}), TypeError);
    await assert.rejects(sb.startProcess("true", { pty: { rows: 0, cols: 80 } }), RangeError);
    await assert.rejects(sb.startProcess("true", { tag: "" }), RangeError);
    await assert.rejects(sb.startProcess("true", { timeout: 0 }), RangeError);
    assert.throws(() => sb.attach(0), RangeError);
    assert.throws(() => sb.attach("t", { fromOffset: -1 }), RangeError);
    await assert.rejects(sb.signal("t", 99), RangeError);
    await assert.rejects(sb.resize("t", 24, 0), RangeError);
    await assert.rejects(sb.execInteractive("sh", { pty: { rows: 24, cols: 5000 } }), RangeError);
    await assert.rejects(sb.watch("relative/dir"), RangeError);
  });

  it("carries the result on CommandError", () => {
    const r = { stdout: "", stderr: "boom", exitCode: 3, signal: 0, timedOut: false, durationMs: 1, ok: false };
    const e = new CommandError("command exited with 3", r);
    assert.ok(e instanceof ForkdError);
    assert.equal(e.result, r);
    assert.equal(e.codeName, "");
  });
});
