// `Controller`: the reference forkd SDK's controller API over this client.
//
// Code written against the reference forkd's `Controller` (snapshots and
// sandboxes as plain snake_case objects, failures as `ControllerError` with
// an HTTP status) runs here unchanged: each method calls `Client` and
// reshapes the answer into the object the reference returns.
//
// What differs (per method below, and in docs/migrating.md): a branch
// defaults to mode "full" as the reference's does, and mode "live" is a diff
// branch (the lowest pause this daemon has); killing a sandbox that is gone
// succeeds; and the spawn options this daemon has no counterpart for
// (liveFork, prewarm) and the `fetch` option throw ControllerError (409,
// FAILED_PRECONDITION, as the daemon answers live_fork) naming what to do
// instead. New code is better served by `Client`.

import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";

import { Client, Sandbox } from "./client.js";
import { ForkdError, codeName, codeOfName } from "./errors.js";
import { SandboxSchema, type Sandbox as SandboxMsg, type Snapshot } from "./gen/forkd/v1/common_pb.js";

/** The HTTP status the REST API answers for each gRPC code (docs/rest.md). */
const HTTP_STATUS: Partial<Record<Code, number>> = {
  [Code.InvalidArgument]: 400,
  [Code.OutOfRange]: 400,
  [Code.Unauthenticated]: 401,
  [Code.PermissionDenied]: 403,
  [Code.NotFound]: 404,
  [Code.AlreadyExists]: 409,
  [Code.FailedPrecondition]: 409,
  [Code.Aborted]: 409,
  [Code.ResourceExhausted]: 429,
  [Code.Canceled]: 499,
  [Code.Unimplemented]: 501,
  [Code.Unavailable]: 503,
  [Code.DeadlineExceeded]: 504,
};

/** The HTTP status the REST API gives `code` (500 for the rest; 0 for an
 * error raised by the client itself). */
function httpStatus(code: Code | undefined): number {
  return code === undefined ? 0 : (HTTP_STATUS[code] ?? 500);
}

/**
 * A failed Controller call. As in the reference SDK, `status` is the HTTP
 * status (404 missing, 409 conflict or not available here, ...; 0 when no
 * call was made), `body` the JSON error body (`{error, code}`, as the REST
 * API sends it) and `url` the REST route of the call (`method` its HTTP
 * method). As every ForkdError, it also has `code` (the gRPC status code),
 * `codeName` and `rawMessage`.
 */
export class ControllerError extends ForkdError {
  readonly status: number;
  readonly body: unknown;
  readonly url: string;
  readonly method: string;

  constructor(status: number, body: unknown, url: string, opts: { code?: Code; method?: string; cause?: unknown } = {}) {
    let message = typeof body === "string" ? body : JSON.stringify(body);
    let code = opts.code;
    if (typeof body === "object" && body !== null) {
      const b = body as { error?: unknown; code?: unknown };
      if (typeof b.error === "string" && b.error) message = b.error;
      if (code === undefined && typeof b.code === "string") code = codeOfName(b.code);
    }
    super(message, code, { cause: opts.cause });
    this.status = status;
    this.body = body;
    this.url = url;
    this.method = opts.method ?? "";
    const route = this.method ? `${this.method} ${url}` : url;
    this.message = `${route}: HTTP ${status}${code === undefined ? "" : ` ${this.codeName}`}: ${message}`;
  }

  /** @internal An error of `code` the REST API would answer with. */
  static of(code: Code, message: string, url: string, method: string): ControllerError {
    const body = { error: message, code: codeName(code) };
    return new ControllerError(httpStatus(code), body, url, { code, method });
  }
}

export interface ControllerOptions {
  /** Default: $FORKD_URL, else http://127.0.0.1:8889. */
  baseUrl?: string;
  /** Default: $FORKD_TOKEN, else $FORKD_TOKEN_FILE, else (loopback) the
   * daemon's own token file, as `Client`. */
  token?: string;
  /** Per-call limit in milliseconds (default 60 000); a command's own
   * `timeoutSecs` stretches it. */
  timeoutMs?: number;
  /** The reference's custom fetch: this Controller speaks gRPC, so giving
   * one throws ControllerError. */
  fetch?: unknown;
}

/** The reference's SnapshotInfo. */
export interface ControllerSnapshotInfo {
  tag: string;
  /** The snapshot's directory on the daemon's host. */
  dir: string;
  created_at_unix: number;
  /** "writing", "ready", "failed" or "deleting". */
  status: string;
  /** Branches only: the source sandbox's id. */
  branched_from?: string;
  /** Branches only: how long the source was paused. */
  pause_ms?: number;
  /** Branches only: how long writing the captured memory took after the source resumed. */
  diff_ms?: number;
  /** Branches only: guest memory bytes the source had written since its
   * snapshot (what a diff branch stores). */
  diff_physical_bytes?: number;
  /** Branches only: the guest RAM size. */
  diff_logical_bytes?: number;
}

/** The reference's SandboxInfo. */
export interface ControllerSandboxInfo {
  id: string;
  snapshot_tag: string;
  /** The network namespace of its NIC; null without one. */
  netns: string | null;
  /** The guest's IP address on its NIC (no agent port: the agent is reached
   * through the daemon); null without one. */
  guest_addr: string | null;
  created_at_unix: number;
  pid: number | null;
  /** null when unlimited. */
  memory_limit_mib: number | null;
  has_branched: boolean;
}

/** Options of `branchSandbox`, named as the reference names them. */
export interface ControllerBranchOptions {
  /** Generated when unset. */
  tag?: string;
  /** "full" (default, as in the reference), "diff", or "live" (a diff branch here). */
  mode?: "full" | "diff" | "live";
  /** Legacy spelling of mode "diff". */
  diff?: boolean;
  /** Takes a full branch; every branch reports diff_physical_bytes here. */
  measure_diff?: boolean;
  /** false: return once the source runs again, the snapshot still "writing". */
  wait?: boolean;
}

export interface ControllerSpawnOptions {
  snapshotTag: string;
  n?: number;
  /** A network namespace and NIC per child (network "nat", no egress unless allowed). */
  perChildNetns?: boolean;
  memoryLimitMib?: number;
  /** No counterpart here: throws ControllerError. */
  prewarm?: boolean;
  /** No counterpart here: throws ControllerError. */
  liveFork?: boolean;
}

export interface ControllerExecResult {
  stdout: string;
  stderr: string;
  /** -1 when a signal or the timeout ended the command. */
  exit_code: number;
}

export interface ControllerEvalResult {
  /** repr() of the last expression ("" for statements). */
  result: string;
  /** The exception and traceback; null when there was none. */
  error: string | null;
  exit_code: number;
}

export interface ControllerPingResult {
  pong: boolean;
  latency_ms: number;
  uptime_secs: number;
  runtime_ready: boolean;
}

/** The reference's SandboxInfo of a sandbox. */
function sandboxInfo(s: SandboxMsg): ControllerSandboxInfo {
  return {
    id: s.id,
    snapshot_tag: s.snapshotTag,
    netns: s.netns || null,
    guest_addr: s.guestAddr || null,
    created_at_unix: Number(s.createdAtUnix),
    pid: s.pid || null,
    memory_limit_mib: s.memoryLimitMib || null,
    has_branched: s.hasBranched,
  };
}

/** The reference's SnapshotInfo of a snapshot: `branched_from` and the
 * branch figures only for branches, as it omits them for built snapshots. */
function snapshotInfo(s: Snapshot): ControllerSnapshotInfo {
  const out: ControllerSnapshotInfo = {
    tag: s.tag,
    dir: s.dir,
    created_at_unix: Number(s.createdAtUnix),
    status: s.status,
  };
  if (s.branchedFrom) {
    out.branched_from = s.branchedFrom;
    out.pause_ms = Number(s.pauseMs);
    out.diff_ms = s.diffMs;
    out.diff_physical_bytes = Number(s.diffPhysicalBytes);
    out.diff_logical_bytes = Number(s.diffLogicalBytes);
  }
  return out;
}

const seg = encodeURIComponent;

/**
 * The reference forkd SDK's controller, over `Client`.
 *
 * @example
 * const ctl = new Controller(); // $FORKD_URL, $FORKD_TOKEN
 * const [child] = await ctl.spawnSandboxes({ snapshotTag: "py" });
 * console.log((await ctl.execCommand(child!.id, ["hostname"])).stdout);
 * await ctl.killSandbox(child!.id);
 */
export class Controller {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  private readonly client: Client;

  constructor(opts: ControllerOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    if (opts.fetch !== undefined) {
      throw ControllerError.of(
        Code.FailedPrecondition,
        "fetch: this Controller speaks gRPC through @forkd/client, not fetch; drop the option",
        opts.baseUrl ?? "",
        "",
      );
    }
    try {
      this.client = new Client({ url: opts.baseUrl, token: opts.token, timeoutMs: this.timeoutMs });
    } catch (e) {
      if (!(e instanceof ForkdError)) throw e;
      throw new ControllerError(0, { error: e.rawMessage }, opts.baseUrl ?? "", { cause: e });
    }
    this.baseUrl = this.client.url;
  }

  // --- snapshots ----------------------------------------------------

  /** Every snapshot, oldest first. */
  listSnapshots(): Promise<ControllerSnapshotInfo[]> {
    return this.call("GET", "/v1/snapshots", async () => (await this.client.snapshots.list()).map(snapshotInfo));
  }

  /** Deletes a snapshot. One that diff branches are layered on is refused
   * (409); delete those first, or use `client.snapshots.delete(tag, { cascade: true })`. */
  async deleteSnapshot(tag: string): Promise<void> {
    await this.call("DELETE", `/v1/snapshots/${seg(tag)}`, () => this.client.snapshots.delete(tag));
  }

  // --- sandboxes ----------------------------------------------------

  /** Forks `n` (default 1) children of `snapshotTag`, all or nothing. */
  spawnSandboxes(options: ControllerSpawnOptions): Promise<ControllerSandboxInfo[]> {
    const path = "/v1/sandboxes";
    const refuse = (what: string) => Promise.reject(ControllerError.of(Code.FailedPrecondition, what, this.baseUrl + path, "POST"));
    if (options.liveFork) {
      return refuse(
        "liveFork: this daemon forks from saved snapshots only; branch the running sandbox " +
          '(branchSandbox(id, { mode: "diff" })) and spawn from the branch',
      );
    }
    if (options.prewarm) {
      return refuse(
        "prewarm (faulting in guest pages for a faster first branch) has no counterpart here: drop it, " +
          "diff branches write only the pages a sandbox wrote; to keep children ready for the " +
          "next fork use new Client().fork(tag, { n, prewarm: true })",
      );
    }
    return this.call("POST", path, async () => {
      const group = await this.client.fork(options.snapshotTag, {
        n: options.n ?? 1,
        ...(options.perChildNetns ? { perChildNetns: true, network: "nat" } : {}),
        ...(options.memoryLimitMib !== undefined ? { memoryLimitMib: options.memoryLimitMib } : {}),
      });
      return group.map((sb) => sandboxInfo(sb.info));
    });
  }

  /** Every sandbox the daemon tracks, oldest first. */
  listSandboxes(): Promise<ControllerSandboxInfo[]> {
    return this.call("GET", "/v1/sandboxes", async () => (await this.client.sandboxes.list()).map((sb) => sandboxInfo(sb.info)));
  }

  getSandbox(sandboxId: string): Promise<ControllerSandboxInfo> {
    return this.call("GET", `/v1/sandboxes/${seg(sandboxId)}`, async () => sandboxInfo((await this.client.sandboxes.get(sandboxId)).info));
  }

  /** Kills a sandbox. Killing one that is already gone succeeds. */
  /** Kills a sandbox; one that is not there is a 404, as in the REST API. */
  async killSandbox(sandboxId: string): Promise<void> {
    const path = `/v1/sandboxes/${seg(sandboxId)}`;
    const killed = await this.call("DELETE", path, () => {
      this.handle(sandboxId); // checks the id
      return this.client.sandboxes.kill({ ids: [sandboxId] });
    });
    if (killed.length === 0) {
      throw ControllerError.of(Code.NotFound, `sandbox ${sandboxId} not found`, this.baseUrl + path, "DELETE");
    }
  }

  /**
   * Snapshots a running sandbox (it keeps running); resolves to the new
   * snapshot. `mode` "full" (the default, as in the reference: a flat copy,
   * independent of the parent) or "diff" (only the pages written since the
   * parent, layered on it; `diff: true` says the same). "live" is a diff
   * branch: this daemon has no UFFD live branch, and a diff branch is its
   * lowest pause.
   */
  branchSandbox(sandboxId: string, options: ControllerBranchOptions = {}): Promise<ControllerSnapshotInfo> {
    const path = `/v1/sandboxes/${seg(sandboxId)}/branch`;
    const invalid = (what: string) => Promise.reject(ControllerError.of(Code.InvalidArgument, what, this.baseUrl + path, "POST"));
    if (options.mode !== undefined && options.diff) return invalid("give mode or diff: true, not both");
    let mode = options.mode ?? (options.diff ? "diff" : "full");
    if (mode === "live") mode = "diff";
    if (options.measure_diff && mode === "diff") return invalid('measure_diff goes with a full branch, not with mode "diff"');
    return this.call("POST", path, async () => {
      return snapshotInfo(await this.handle(sandboxId).branch({ tag: options.tag, mode, wait: options.wait ?? true }));
    });
  }

  /** Runs `args` (argv; a string is run with `sh -c`) to completion. */
  execCommand(sandboxId: string, args: string[] | string, options: { timeoutSecs?: number } = {}): Promise<ControllerExecResult> {
    return this.call("POST", `/v1/sandboxes/${seg(sandboxId)}/exec`, async () => {
      const r = await this.handle(sandboxId).exec(args, { timeout: options.timeoutSecs ?? 30 });
      return { stdout: r.stdout, stderr: r.stderr, exit_code: r.exitCode };
    });
  }

  /** Evaluates Python in the sandbox's warm interpreter. */
  evalCode(sandboxId: string, code: string): Promise<ControllerEvalResult> {
    return this.call("POST", `/v1/sandboxes/${seg(sandboxId)}/eval`, async () => {
      const r = await this.handle(sandboxId).eval(code);
      return { result: r.result, error: r.error || null, exit_code: r.exitCode };
    });
  }

  /** A round trip to the guest agent. */
  pingSandbox(sandboxId: string): Promise<ControllerPingResult> {
    return this.call("POST", `/v1/sandboxes/${seg(sandboxId)}/ping`, async () => {
      const p = await this.handle(sandboxId).ping();
      return { pong: p.ok, latency_ms: p.latencyMs, uptime_secs: p.uptimeSecs, runtime_ready: p.runtimeReady };
    });
  }

  // --- internals ----------------------------------------------------

  /** Runs `fn` as the call `method path` of the REST API: its errors are
   * thrown as ControllerError naming that route. */
  private async call<T>(method: string, path: string, fn: () => Promise<T>): Promise<T> {
    const url = this.baseUrl + path;
    try {
      return await fn();
    } catch (e) {
      if (e instanceof ControllerError) throw e;
      if (e instanceof ForkdError) {
        const body: { error: string; code?: string } = { error: e.rawMessage };
        if (e.code !== undefined) body.code = e.codeName;
        throw new ControllerError(httpStatus(e.code), body, url, { code: e.code, method, cause: e });
      }
      // The client's own argument checks.
      if (e instanceof TypeError || e instanceof RangeError) {
        throw ControllerError.of(Code.InvalidArgument, e.message, url, method);
      }
      throw e;
    }
  }

  /** A handle on a sandbox by id, without fetching it. */
  private handle(sandboxId: string): Sandbox {
    if (typeof sandboxId !== "string" || !sandboxId) throw new TypeError(`invalid sandbox id ${JSON.stringify(sandboxId)}`);
    return new Sandbox(this.client, create(SandboxSchema, { id: sandboxId }));
  }
}
