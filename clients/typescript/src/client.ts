// The forkd client: gRPC over HTTP/2 (Connect's gRPC transport for Node),
// with an ergonomic layer over the generated service descriptors.

import { accessSync, constants as fsConstants, readFileSync, statSync } from "node:fs";

import type { MessageInitShape } from "@bufbuild/protobuf";
import { createClient, type CallOptions, type Client as RpcClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import type { Sandbox as SandboxMsg, Snapshot } from "./gen/forkd/v1/common_pb.js";
import {
  FileEvent_Kind,
  SandboxService,
  type ExecEvent,
  type ExecInputSchema,
  type ExecResponse,
  type EvalResponse,
  type FileEvents,
  type FileInfo,
  type ProcessInfo as ProcessInfoMsg,
} from "./gen/forkd/v1/sandbox_pb.js";
import { SnapshotService } from "./gen/forkd/v1/snapshot_pb.js";
import { SystemService } from "./gen/forkd/v1/system_pb.js";
import { WorkspaceService } from "./gen/forkd/v1/workspace_pb.js";
import { CommandError, DeadlineExceededError, ForkdError, NotFoundError, SnapshotFailedError, toForkdError } from "./errors.js";
import type {
  DeleteSnapshotResult,
  DeleteWorkspaceResult,
  EvalResult,
  Event,
  ExecResult,
  FileEvent,
  FileEventKind,
  OutputChunk,
  PingResult,
  ProcessChunk,
  ProcessInfo,
  ProcessRef,
  PtySize,
  PoolInfo,
  PushResult,
  RemoteSnapshot,
  SnapshotInfo,
  VersionInfo,
  WorkspaceInfo,
} from "./types.js";

export const DEFAULT_URL = "http://127.0.0.1:8889";

/** Bytes per WriteFile message; well under the daemon's 16 MiB message limit. */
export const WRITE_CHUNK = 1 << 20;

/** Most stdin bytes per SendStdin call (the daemon's limit) and per
 * interactive stdin message. */
export const STDIN_CHUNK = 1 << 20;

/** Extra time a call's deadline gets beyond the command timeout it carries,
 * so the daemon's own timeout (and its clean result) wins the race. */
const DEADLINE_GRACE_MS = 30_000;

export interface ClientOptions {
  /** Default: $FORKD_URL, else http://127.0.0.1:8889. A bare HOST:PORT means http. */
  url?: string;
  /**
   * Default: $FORKD_TOKEN, else the contents of $FORKD_TOKEN_FILE, else (loopback
   * URLs) the daemon's own /var/lib/forkd/token when it may be read.
   */
  token?: string;
  /** PEM (string/Buffer) or a path to the CA that signed the daemon's
   * certificate, for https URLs. Default: $FORKD_CA_CERT, else system roots. */
  caCert?: string | Uint8Array;
  /** Per-call limit in milliseconds for calls with no longer natural duration. */
  timeoutMs?: number;
}

/** Options of `fork`: CreateSandboxesRequest fields, camelCased. */
export interface ForkOptions {
  n?: number;
  labels?: Record<string, string>;
  network?: string;
  allow?: string[];
  memoryLimitMib?: number;
  cpuQuota?: number;
  pidsLimit?: number;
  perChildNetns?: boolean;
  ttlSecs?: number;
  idleTimeoutSecs?: number;
  volumes?: string[];
  prewarm?: boolean;
  liveFork?: boolean;
  hugepages?: boolean;
  /** Pull the snapshot from the daemon's remote first when it is not on the
   * daemon's host (unset: the daemon's --pull-missing setting). */
  pullMissing?: boolean;
}

export interface ExecOptions {
  /** Seconds; the daemon's default is 60. */
  timeout?: number;
  env?: Record<string, string>;
  cwd?: string;
  stdin?: string | Uint8Array;
  /** Throw CommandError when the command fails (exec only). */
  check?: boolean;
  signal?: AbortSignal;
}

/** Options of `startProcess`. */
export interface StartProcessOptions {
  /** Names the process for later calls: 1–64 of [A-Za-z0-9._-], not all digits. */
  tag?: string;
  /** Run on a pseudo-terminal of this size. */
  pty?: PtySize;
  /** Keep stdin open for `sendStdin` (a PTY always has input). */
  stdin?: boolean;
  env?: Record<string, string>;
  cwd?: string;
  /** Seconds until the process group is killed; by default no limit. */
  timeout?: number;
}

/** Options of `execInteractive`. */
export interface InteractiveOptions {
  /** Run on a pseudo-terminal of this size. */
  pty?: PtySize;
  /** Names the process, to attach to it later. */
  tag?: string;
  env?: Record<string, string>;
  cwd?: string;
  /** Seconds until the process group is killed; by default no limit. */
  timeout?: number;
  /** Aborting it detaches, as `close()` does. */
  signal?: AbortSignal;
}

export interface CreateSnapshotOptions {
  image?: string;
  /** Return only once ready (default true). */
  wait?: boolean;
  vcpus?: number;
  memMib?: number;
  /** Seconds the daemon waits for the runtime to become ready. */
  warmTimeout?: number;
  warmEval?: string;
  volumes?: string[];
  labels?: Record<string, string>;
  /** Milliseconds to wait for "ready" before DeadlineExceededError. */
  timeoutMs?: number;
  pollIntervalMs?: number;
}

type Args = string | readonly string[];

interface Normalised {
  baseUrl: string;
  secure: boolean;
}

/** Accepts http://HOST:PORT, https://HOST:PORT or a bare HOST:PORT (http). */
export function parseUrl(raw: string): Normalised {
  const s = raw.trim();
  if (!s) throw new ForkdError("the daemon URL is empty");
  const withScheme = s.includes("://") ? s : `http://${s}`;
  let u: URL;
  try {
    u = new URL(withScheme);
  } catch {
    throw new ForkdError(`invalid URL ${JSON.stringify(raw)}`);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") {
    throw new ForkdError(`unsupported URL ${JSON.stringify(raw)}: use http://HOST:PORT or https://HOST:PORT`);
  }
  if (!u.hostname) throw new ForkdError(`URL ${JSON.stringify(raw)} names no host`);
  if ((u.pathname !== "/" && u.pathname !== "") || u.search || u.hash) {
    throw new ForkdError(`URL ${JSON.stringify(raw)} must not have a path: gRPC is served at the root`);
  }
  return { baseUrl: `${u.protocol}//${u.host}`, secure: u.protocol === "https:" };
}

/** Where the daemon writes its token on a host nobody configured. */
export const DEFAULT_TOKEN_FILE = "/var/lib/forkd/token";

function readTokenFile(path: string, what: string): string {
  let text: string;
  try {
    const st = statSync(path);
    const mode = st.mode;
    // A group that is the caller's own (a pod's fsGroup) shares nothing.
    const ownGid = process.getegid ? process.getegid() : -1;
    if (mode & 0o007 || (mode & 0o070 && st.gid !== ownGid)) {
      const shown = (mode & 0o7777).toString(8).padStart(4, "0");
      throw new ForkdError(
        `${what} ${path} may be read by others (mode ${shown}); only its owner may read it: run \`chmod 600 ${path}\``,
      );
    }
    text = readFileSync(path, "utf8").trim();
  } catch (e) {
    if (e instanceof ForkdError) throw e;
    throw new ForkdError(`${what} ${path}: ${(e as Error).message}`);
  }
  // An empty token file is a mistake worth reporting, not "no auth".
  if (!text) throw new ForkdError(`${what} ${path} is empty`);
  return text;
}

/** True for a base URL naming this host: localhost, 127/8 or ::1. */
export function isLoopbackUrl(baseUrl: string): boolean {
  const host = new URL(baseUrl).hostname.replace(/^\[|\]$/g, "").toLowerCase();
  if (host === "localhost" || host === "::1") return true;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

function resolveToken(token: string | undefined, baseUrl: string): string | undefined {
  if (token !== undefined) return token.trim() || undefined;
  const env = process.env.FORKD_TOKEN?.trim();
  if (env) return env;
  const file = process.env.FORKD_TOKEN_FILE?.trim();
  if (file) return readTokenFile(file, "FORKD_TOKEN_FILE");
  if (isLoopbackUrl(baseUrl)) {
    try {
      accessSync(DEFAULT_TOKEN_FILE, fsConstants.R_OK);
    } catch {
      return undefined;
    }
    return readTokenFile(DEFAULT_TOKEN_FILE, "token file");
  }
  return undefined;
}

function resolveCa(ca: string | Uint8Array | undefined): Uint8Array | string | undefined {
  if (ca instanceof Uint8Array) return ca;
  if (ca !== undefined && ca.includes("-----BEGIN")) return ca;
  const path = ca ?? process.env.FORKD_CA_CERT?.trim();
  if (!path) return undefined;
  try {
    return readFileSync(path);
  } catch (e) {
    throw new ForkdError(`CA certificate ${path}: ${(e as Error).message}`);
  }
}

/** A string is a shell command line (run with `sh -c`); an array is argv. */
export function argv(args: Args): string[] {
  if (typeof args === "string") return ["sh", "-c", args];
  const out = [...args];
  if (out.length === 0 || !out.every((a) => typeof a === "string")) {
    throw new TypeError("args must be a non-empty array of strings, or a shell command string");
  }
  return out;
}

function wholeSeconds(timeout: number | undefined): number {
  if (timeout === undefined) return 0;
  if (!(timeout > 0)) throw new RangeError("timeout must be positive");
  return Math.ceil(timeout);
}

function toBytes(data: string | Uint8Array): Uint8Array {
  return typeof data === "string" ? new TextEncoder().encode(data) : data;
}

const decoder = new TextDecoder();

/** `data` in STDIN_CHUNK pieces; at least one (possibly empty). */
function stdinChunks(data: string | Uint8Array): Uint8Array[] {
  const blob = toBytes(data);
  const out: Uint8Array[] = [];
  for (let off = 0; off < blob.length; off += STDIN_CHUNK) out.push(blob.subarray(off, off + STDIN_CHUNK));
  return out.length ? out : [new Uint8Array()];
}

/** Checks a terminal size: integers of 1–1000. */
export function ptySize(size: PtySize): PtySize {
  if (typeof size !== "object" || size === null) throw new TypeError("a terminal size is { rows, cols }");
  for (const [name, v] of [["rows", size.rows], ["cols", size.cols]] as const) {
    if (typeof v !== "number" || !Number.isInteger(v)) throw new TypeError(`pty ${name} must be an integer, not ${String(v)}`);
    if (v < 1 || v > 1000) throw new RangeError(`pty ${name} must be 1-1000, not ${v}`);
  }
  return { rows: size.rows, cols: size.cols };
}

/** The daemon's name for a process: its pid (digits) or its tag. */
export function processRef(p: ProcessRef): string {
  if (typeof p === "object" && p !== null && typeof p.pid === "number") return String(p.pid);
  if (typeof p === "number") {
    if (!Number.isInteger(p) || p < 1) throw new RangeError(`a pid is a positive integer, not ${p}`);
    return String(p);
  }
  if (typeof p !== "string") throw new TypeError("a process is a pid, a tag or a ProcessInfo");
  if (!p) throw new RangeError("the process tag is empty");
  return p;
}

/** A signal as the daemon takes it: a number (1–64) or a name ("TERM", "SIGINT", "kill"). */
export function signalArg(sig: string | number): string {
  if (typeof sig === "number") {
    if (!Number.isInteger(sig) || sig < 1 || sig > 64) throw new RangeError(`signal numbers are 1-64, not ${sig}`);
    return String(sig);
  }
  if (typeof sig !== "string") throw new TypeError("a signal is a number or a name");
  const name = sig.trim();
  if (!name) throw new RangeError("the signal name is empty");
  return name;
}

function optionalTag(tag: string | undefined): string {
  if (tag !== undefined && (typeof tag !== "string" || !tag)) throw new RangeError("tag must be a non-empty string");
  return tag ?? "";
}

function processInfo(p: ProcessInfoMsg): ProcessInfo {
  return {
    pid: p.pid,
    tag: p.tag,
    args: [...p.args],
    cwd: p.cwd,
    pty: p.pty,
    stdinOpen: p.stdinOpen,
    startedUnixMs: Number(p.startedUnixMs),
    outputBytes: Number(p.outputBytes),
    running: p.running,
    exit: p.exit ? execResult(p.exit) : undefined,
  };
}

/** One FileEvents message as FileEvents, an "overflow" marker first when
 * events were lost before them. */
function fileEvents(batch: FileEvents, root: string): FileEvent[] {
  const out: FileEvent[] = batch.overflow ? [{ kind: "overflow", path: root, from: "", isDir: false }] : [];
  for (const e of batch.events) {
    const name = FileEvent_Kind[e.kind] as string | undefined;
    const kind = (name ? name.toLowerCase() : `unknown-${e.kind}`) as FileEventKind;
    out.push({ kind, path: e.path, from: e.from, isDir: e.isDir });
  }
  return out;
}

/** After aborting a stream: reads it once more, so that the transport sees
 * the abort and releases the call (its deadline timer among others) even
 * when nobody reads the stream any more. */
function settle(it: AsyncIterator<unknown>): void {
  it.next().then(
    () => {},
    () => {},
  );
}

/** An AbortController that also aborts when `outer` does. */
function linkedAbort(outer: AbortSignal | undefined): AbortController {
  const ac = new AbortController();
  if (outer?.aborted) ac.abort(outer.reason);
  else outer?.addEventListener("abort", () => ac.abort(outer.reason), { once: true });
  return ac;
}

/** The request stream of an interactive exec: messages pushed by the
 * handle's methods, in order, until it is closed. */
class Outbox<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private wake: (() => void) | undefined;
  closed = false;

  push(item: T): void {
    this.items.push(item);
    this.wake?.();
  }

  close(): void {
    this.closed = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T> {
    for (;;) {
      while (this.items.length) yield this.items.shift()!;
      if (this.closed) return;
      await new Promise<void>((res) => (this.wake = res));
      this.wake = undefined;
    }
  }
}


function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function execResult(r: ExecResponse, stdout?: string, stderr?: string): ExecResult {
  return {
    stdout: stdout ?? r.stdout,
    stderr: stderr ?? r.stderr,
    exitCode: r.exitCode,
    signal: r.signal,
    timedOut: r.timedOut,
    durationMs: r.durationMs,
    ok: r.exitCode === 0 && !r.timedOut,
  };
}

function checkExec(r: ExecResult): ExecResult {
  if (!r.ok) {
    const why = r.timedOut ? "timed out" : r.signal ? `was killed by signal ${r.signal}` : `exited with ${r.exitCode}`;
    const tail = r.stderr.trim().slice(-500);
    throw new CommandError(`command ${why}${tail ? `: ${tail}` : ""}`, r);
  }
  return r;
}

function evalResult(r: EvalResponse): EvalResult {
  return {
    result: r.result,
    error: r.error,
    exitCode: r.exitCode,
    stdout: r.stdout,
    stderr: r.stderr,
    ok: !r.error && r.exitCode === 0,
  };
}

const sleep = (ms: number) => new Promise((res) => setTimeout(res, ms));

/** Awaits a unary call, rethrowing its error as a ForkdError. */
async function call<T>(p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    throw toForkdError(e);
  }
}

/** Iterates a server stream, rethrowing its error as a ForkdError. */
async function* typed<T>(it: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* it;
  } catch (e) {
    throw toForkdError(e);
  }
}

/** A connection to a forkd daemon. */
export class Client {
  readonly url: string;
  readonly snapshots: Snapshots;
  readonly sandboxes: Sandboxes;
  readonly workspaces: Workspaces;
  /** @internal */ readonly rpc: {
    snap: RpcClient<typeof SnapshotService>;
    sb: RpcClient<typeof SandboxService>;
    ws: RpcClient<typeof WorkspaceService>;
    sys: RpcClient<typeof SystemService>;
  };
  /** @internal */ readonly timeoutMs: number | undefined;

  constructor(opts: ClientOptions = {}) {
    const target = parseUrl(opts.url ?? (process.env.FORKD_URL?.trim() || DEFAULT_URL));
    this.url = target.baseUrl;
    const token = resolveToken(opts.token, target.baseUrl);
    const ca = resolveCa(opts.caCert);
    if (ca !== undefined && !target.secure) {
      throw new ForkdError(`a CA certificate was given but ${this.url} is not an https:// URL`);
    }
    const auth: Interceptor = (next) => (req) => {
      if (token) req.header.set("authorization", `Bearer ${token}`);
      return next(req);
    };
    const transport = createGrpcTransport({
      baseUrl: this.url,
      interceptors: [auth],
      nodeOptions: ca !== undefined ? { ca: typeof ca === "string" ? ca : Buffer.from(ca) } : {},
      readMaxBytes: 64 << 20,
      writeMaxBytes: 16 << 20,
    });
    this.rpc = {
      snap: createClient(SnapshotService, transport),
      sb: createClient(SandboxService, transport),
      ws: createClient(WorkspaceService, transport),
      sys: createClient(SystemService, transport),
    };
    this.timeoutMs = opts.timeoutMs;
    this.snapshots = new Snapshots(this);
    this.sandboxes = new Sandboxes(this);
    this.workspaces = new Workspaces(this);
  }

  /** @internal Call options: the client default, stretched for a command timeout. */
  opts(commandTimeoutSecs?: number, signal?: AbortSignal): CallOptions {
    let timeoutMs = this.timeoutMs;
    if (commandTimeoutSecs !== undefined) {
      const need = commandTimeoutSecs * 1000 + DEADLINE_GRACE_MS;
      timeoutMs = timeoutMs === undefined ? need : Math.max(timeoutMs, need);
    }
    return { timeoutMs, signal };
  }

  /** The daemon's version, backend, accelerator and counts. */
  version(): Promise<VersionInfo> {
    return call(this.rpc.sys.getVersion({}, this.opts()));
  }

  /** Forks `n` (default 1) copy-on-write children of the ready snapshot `tag`.
   * All or nothing: on error no child is left running. */
  async fork(tag: string, opts: ForkOptions = {}): Promise<SandboxGroup> {
    const n = opts.n ?? 1;
    if (!Number.isInteger(n) || n < 1) throw new RangeError("n must be an integer of at least 1");
    const resp = await call(this.rpc.sb.createSandboxes({ ...opts, snapshotTag: tag, n }, this.opts()));
    return SandboxGroup.from(resp.sandboxes.map((info) => new Sandbox(this, info))) as SandboxGroup;
  }

  /** Forks one child. */
  async sandbox(tag: string, opts: Omit<ForkOptions, "n"> = {}): Promise<Sandbox> {
    return (await this.fork(tag, { ...opts, n: 1 }))[0]!;
  }

  /** Forks children, runs `fn` with them and kills them however `fn` ends. */
  async withSandboxes<T>(tag: string, opts: ForkOptions, fn: (sandboxes: SandboxGroup) => Promise<T>): Promise<T> {
    const group = await this.fork(tag, opts);
    try {
      return await fn(group);
    } finally {
      await group.kill();
    }
  }

  /** Forks one child, runs `fn` with it and kills it however `fn` ends. */
  async withSandbox<T>(tag: string, fn: (sandbox: Sandbox) => Promise<T>, opts: Omit<ForkOptions, "n"> = {}): Promise<T> {
    return this.withSandboxes(tag, { ...opts, n: 1 }, (g) => fn(g[0]!));
  }
}

/** `client.snapshots`: create, inspect and manage snapshots. */
export class Snapshots {
  constructor(private readonly c: Client) {}

  /** Boots `image` (default "python"), warms it and saves it as `tag`; by
   * default waits until it is ready (SnapshotFailedError if it fails). */
  async create(tag: string, opts: CreateSnapshotOptions = {}): Promise<SnapshotInfo> {
    const snap = await call(
      this.c.rpc.snap.createSnapshot(
        {
          tag,
          image: opts.image ?? "python",
          vcpus: opts.vcpus ?? 0,
          memMib: opts.memMib ?? 0,
          warmTimeoutSecs: wholeSeconds(opts.warmTimeout),
          warmEval: opts.warmEval ?? "",
          volumes: opts.volumes ?? [],
          labels: opts.labels ?? {},
        },
        this.c.opts(),
      ),
    );
    if (opts.wait === false) return snap;
    return this.wait(tag, opts);
  }

  /** Polls until `tag` leaves "writing"; resolves once it is "ready". */
  async wait(tag: string, opts: { timeoutMs?: number; pollIntervalMs?: number } = {}): Promise<SnapshotInfo> {
    const end = opts.timeoutMs === undefined ? undefined : Date.now() + opts.timeoutMs;
    for (;;) {
      const snap = await this.get(tag);
      if (snap.status === "ready") return snap;
      if (snap.status !== "writing") throw new SnapshotFailedError(tag, snap.statusReason || `status "${snap.status}"`);
      if (end !== undefined && Date.now() >= end) {
        throw new DeadlineExceededError(`snapshot "${tag}" still writing after ${opts.timeoutMs} ms`);
      }
      await sleep(opts.pollIntervalMs ?? 500);
    }
  }

  /** All snapshots, oldest first; `status` filters ("ready", ...). */
  async list(status = ""): Promise<SnapshotInfo[]> {
    return (await call(this.c.rpc.snap.listSnapshots({ status }, this.c.opts()))).snapshots;
  }

  get(tag: string): Promise<SnapshotInfo> {
    return call(this.c.rpc.snap.getSnapshot({ tag }, this.c.opts()));
  }

  /** Deletes `tag`; with dependents only when `cascade` or `force`. */
  delete(tag: string, opts: { cascade?: boolean; force?: boolean } = {}): Promise<DeleteSnapshotResult> {
    return call(this.c.rpc.snap.deleteSnapshot({ tag, cascade: !!opts.cascade, force: !!opts.force }, this.c.opts()));
  }

  /** Writes a flat, parentless copy of `tag` named `to`. */
  compact(tag: string, to: string): Promise<SnapshotInfo> {
    return call(this.c.rpc.snap.compactSnapshot({ tag, to }, this.c.opts()));
  }

  /** Runs a command in a child of `fromTag` and saves the result as `tag`. */
  derive(fromTag: string, tag: string, args: Args, opts: { timeout?: number } = {}): Promise<SnapshotInfo> {
    const req = { fromTag, tag, exec: argv(args), timeoutSecs: wholeSeconds(opts.timeout) };
    return call(this.c.rpc.snap.deriveSnapshot(req, this.c.opts(opts.timeout ?? 300)));
  }

  /** The packed snapshot as a stream of byte chunks. */
  async *export(tag: string, opts: { layerOnly?: boolean } = {}): AsyncGenerator<Uint8Array> {
    for await (const chunk of typed(this.c.rpc.snap.exportSnapshot({ tag, layerOnly: !!opts.layerOnly }, this.c.opts()))) {
      yield chunk.data;
    }
  }

  /** Stores a packed snapshot (as produced by `export`) as `tag`. */
  import(tag: string, chunks: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<SnapshotInfo> {
    async function* requests() {
      let first = true;
      for await (const data of chunks) {
        yield { tag: first ? tag : "", data };
        first = false;
      }
      if (first) yield { tag, data: new Uint8Array() };
    }
    return call(this.c.rpc.snap.importSnapshot(requests(), this.c.opts()));
  }

  /** Uploads `tag` and its chain to the daemon's remote (`--remote`): only
   * the blobs the remote lacks. `remote`, if given, must be the daemon's own
   * remote URL. Admins only. */
  push(tag: string, remote = ""): Promise<PushResult> {
    return call(this.c.rpc.snap.pushSnapshot({ tag, remote }, this.c.opts()));
  }

  /** Downloads `tag` (and what this host lacks of its chain) from the
   * daemon's remote; verified before it is visible. */
  pull(tag: string, remote = ""): Promise<SnapshotInfo> {
    return call(this.c.rpc.snap.pullSnapshot({ remote, tag }, this.c.opts()));
  }

  /** The snapshots the daemon's remote holds. */
  async listRemote(): Promise<RemoteSnapshot[]> {
    return (await call(this.c.rpc.snap.listRemoteSnapshots({}, this.c.opts()))).snapshots;
  }

  /** Hot pools of the snapshots you may fork from: children ready, being
   * made, kept, and their network. */
  async pools(): Promise<PoolInfo[]> {
    return (await call(this.c.rpc.snap.listPools({}, this.c.opts()))).pools;
  }

  /** Keeps `target` hot children of `tag` (0 empties the pool), made with
   * `network` "none" (the default) or "nat". Admins only. */
  setPool(tag: string, target: number, options: { network?: "none" | "nat" } = {}): Promise<PoolInfo> {
    return call(this.c.rpc.snap.setPool({ tag, target, network: options.network ?? "none" }, this.c.opts()));
  }
}

/** `client.sandboxes`: find and kill running sandboxes. */
export class Sandboxes {
  constructor(private readonly c: Client) {}

  async list(snapshotTag = ""): Promise<Sandbox[]> {
    const resp = await call(this.c.rpc.sb.listSandboxes({ snapshotTag }, this.c.opts()));
    return resp.sandboxes.map((info) => new Sandbox(this.c, info));
  }

  async get(id: string): Promise<Sandbox> {
    return new Sandbox(this.c, await call(this.c.rpc.sb.getSandbox({ id }, this.c.opts())));
  }

  /** Kills sandboxes by id, every child of `snapshotTag`, or `all`; resolves to the ids killed. */
  async kill(opts: { ids?: string[]; snapshotTag?: string; all?: boolean }): Promise<string[]> {
    const req = { ids: opts.ids ?? [], snapshotTag: opts.snapshotTag ?? "", all: !!opts.all };
    return (await call(this.c.rpc.sb.deleteSandboxes(req, this.c.opts()))).deleted;
  }

  /** Lifecycle events as they happen; abort `signal` (or break) to stop. */
  events(
    filter: { sandboxId?: string; workspace?: string; snapshotTag?: string } = {},
    signal?: AbortSignal,
  ): AsyncGenerator<Event> {
    return typed(this.c.rpc.sb.watchEvents(filter, this.c.opts(undefined, signal)));
  }
}

/** A running child VM. */
export class Sandbox {
  readonly id: string;
  readonly files: Files;

  constructor(
    /** @internal */ readonly client: Client,
    public info: SandboxMsg,
  ) {
    this.id = info.id;
    this.files = new Files(this);
  }

  /** Fetches the sandbox's current record. */
  async refresh(): Promise<SandboxMsg> {
    this.info = await call(this.client.rpc.sb.getSandbox({ id: this.id }, this.client.opts()));
    return this.info;
  }

  private execRequest(args: Args, o: ExecOptions) {
    return {
      id: this.id,
      args: argv(args),
      timeoutSecs: wholeSeconds(o.timeout),
      env: o.env ?? {},
      cwd: o.cwd ?? "",
      stdin: o.stdin === undefined ? new Uint8Array() : toBytes(o.stdin),
    };
  }

  /** Runs a command to completion. `args` is argv, or a string run with `sh -c`. */
  async exec(args: Args, opts: ExecOptions = {}): Promise<ExecResult> {
    const resp = await call(this.client.rpc.sb.exec(this.execRequest(args, opts), this.client.opts(opts.timeout ?? 60, opts.signal)));
    const r = execResult(resp);
    return opts.check ? checkExec(r) : r;
  }

  /** Runs a command and yields its output as it arrives:
   * `for await (const { stream, data } of sb.execStream(...))`. */
  execStream(args: Args, opts: ExecOptions = {}): ExecStream {
    const events = this.client.rpc.sb.execStream(this.execRequest(args, opts), this.client.opts(opts.timeout ?? 60, opts.signal));
    return new ExecStream(typed(events));
  }

  /** Starts a detached process: it keeps running after this call and when
   * clients go away; read its output with `attach`. */
  async startProcess(args: Args, opts: StartProcessOptions = {}): Promise<ProcessInfo> {
    const req = {
      id: this.id,
      args: argv(args),
      env: opts.env ?? {},
      cwd: opts.cwd ?? "",
      tag: optionalTag(opts.tag),
      pty: opts.pty === undefined ? undefined : ptySize(opts.pty),
      stdin: !!opts.stdin,
      timeoutSecs: wholeSeconds(opts.timeout),
    };
    return processInfo(await call(this.client.rpc.sb.startProcess(req, this.client.opts())));
  }

  /** Processes started with `startProcess` or `execInteractive`, running and recently exited. */
  async processes(): Promise<ProcessInfo[]> {
    const resp = await call(this.client.rpc.sb.listProcesses({ id: this.id }, this.client.opts()));
    return resp.processes.map(processInfo);
  }

  /** A process's output: what is still buffered (from `fromOffset`), then
   * live until it exits: `for await (const { stream, data } of sb.attach(p))`;
   * `result` holds the exit afterwards. */
  attach(process: ProcessRef, opts: { fromOffset?: number | bigint; signal?: AbortSignal } = {}): ProcessStream {
    const from = opts.fromOffset ?? 0;
    if (typeof from === "number" ? !Number.isInteger(from) || from < 0 : from < 0n) {
      throw new RangeError(`fromOffset must be a non-negative integer, not ${from}`);
    }
    const req = { id: this.id, process: processRef(process), fromOffset: BigInt(from) };
    const abort = linkedAbort(opts.signal);
    // No deadline: the call lasts as long as the process.
    return new ProcessStream(this.client.rpc.sb.attachProcess(req, { signal: abort.signal }), abort);
  }

  /** Sends a signal to the process's group: a number or a name ("TERM", "SIGINT", "kill"). */
  async signal(process: ProcessRef, sig: string | number): Promise<ProcessInfo> {
    const req = { id: this.id, process: processRef(process), signal: signalArg(sig) };
    return processInfo(await call(this.client.rpc.sb.signalProcess(req, this.client.opts())));
  }

  /** Writes to the process's stdin (its terminal, for a PTY); `close` ends
   * stdin after the data. Strings are UTF-8. */
  async sendStdin(process: ProcessRef, data: string | Uint8Array, opts: { close?: boolean } = {}): Promise<ProcessInfo> {
    const ref = processRef(process);
    const parts = stdinChunks(data);
    let info: ProcessInfoMsg | undefined;
    for (const [i, part] of parts.entries()) {
      const close = !!opts.close && i === parts.length - 1;
      info = await call(this.client.rpc.sb.sendStdin({ id: this.id, process: ref, data: part, close }, this.client.opts()));
    }
    return processInfo(info!);
  }

  /** Ends the process's stdin (it reads end of file). */
  async closeStdin(process: ProcessRef): Promise<ProcessInfo> {
    const req = { id: this.id, process: processRef(process) };
    return processInfo(await call(this.client.rpc.sb.closeStdin(req, this.client.opts())));
  }

  /** Sets the terminal size of a process on a PTY. */
  async resize(process: ProcessRef, rows: number, cols: number): Promise<ProcessInfo> {
    const req = { id: this.id, process: processRef(process), size: ptySize({ rows, cols }) };
    return processInfo(await call(this.client.rpc.sb.resizePty(req, this.client.opts())));
  }

  /**
   * Starts a command to talk to, resolving once it runs: `send`,
   * `closeStdin`, `resize`, `signal`; iterate it for output and `wait()` for
   * the exit. `pty` runs it on a terminal. The command is a process of the
   * sandbox: `close()` detaches and it keeps running.
   */
  async execInteractive(args: Args, opts: InteractiveOptions = {}): Promise<InteractiveProcess> {
    const start = {
      id: this.id,
      args: argv(args),
      timeoutSecs: wholeSeconds(opts.timeout),
      env: opts.env ?? {},
      cwd: opts.cwd ?? "",
      pty: opts.pty === undefined ? undefined : ptySize(opts.pty),
      tag: optionalTag(opts.tag),
    };
    const outbox = new Outbox<MessageInitShape<typeof ExecInputSchema>>();
    outbox.push({ input: { case: "start", value: start } });
    const abort = linkedAbort(opts.signal);
    // No deadline unless the command has a timeout: it lasts as long as the process.
    const timeoutMs = opts.timeout === undefined ? undefined : this.client.opts(opts.timeout).timeoutMs;
    const events = this.client.rpc.sb.execInteractive(outbox, { timeoutMs, signal: abort.signal });
    const p = new InteractiveProcess(events, abort, outbox);
    try {
      await p.untilStarted();
    } catch (e) {
      p.close();
      throw e;
    }
    return p;
  }

  /**
   * File-system changes under the guest directory `path` (and below it,
   * unless `recursive: false`), resolving once the daemon has armed the
   * watch: `for await (const ev of watch)`. It never ends by itself:
   * `close()` it (or abort `signal`).
   */
  async watch(path: string, opts: { recursive?: boolean; signal?: AbortSignal } = {}): Promise<FileWatch> {
    if (!path.startsWith("/")) throw new RangeError(`the watched path must be absolute, not ${JSON.stringify(path)}`);
    const abort = linkedAbort(opts.signal);
    let armed!: () => void;
    const headers = new Promise<void>((res) => (armed = res));
    const batches = this.client.rpc.sb.watchFiles(
      { id: this.id, path, recursive: opts.recursive ?? true },
      {
        ...this.client.opts(undefined, abort.signal),
        // Headers without a status mean the watch is armed; a refusal (no
        // such directory, ...) is a trailers-only answer and fails `first`.
        onHeader: (h) => {
          if (!h.has("grpc-status")) armed();
        },
      },
    );
    const it = batches[Symbol.asyncIterator]();
    const first = it.next();
    first.catch(() => {}); // awaited below or by the iteration; never unhandled
    try {
      await Promise.race([headers, first]);
    } catch (e) {
      abort.abort();
      throw toForkdError(e);
    }
    return new FileWatch(it, first, abort, path);
  }

  /** Evaluates Python in the warm interpreter; names persist between calls. */
  async eval(code: string, opts: { timeout?: number; check?: boolean; signal?: AbortSignal } = {}): Promise<EvalResult> {
    const req = { id: this.id, code, timeoutSecs: wholeSeconds(opts.timeout) };
    const r = evalResult(await call(this.client.rpc.sb.eval(req, this.client.opts(opts.timeout ?? 60, opts.signal))));
    if (opts.check && !r.ok) throw new CommandError(`evaluation failed: ${r.error.trim().slice(-500) || `exit code ${r.exitCode}`}`, r);
    return r;
  }

  ping(): Promise<PingResult> {
    return call(this.client.rpc.sb.ping({ id: this.id }, this.client.opts()));
  }

  /** Sets a new TTL in seconds counted from now (0 = none) and marks the sandbox active. */
  async renew(ttlSecs = 0): Promise<SandboxMsg> {
    this.info = await call(this.client.rpc.sb.renewSandbox({ id: this.id, ttlSecs }, this.client.opts()));
    return this.info;
  }

  /** Snapshots this running sandbox (it keeps running). */
  branch(opts: { tag?: string; mode?: "diff" | "full"; wait?: boolean } = {}): Promise<Snapshot> {
    const mode = opts.mode ?? "diff";
    if (mode !== "diff" && mode !== "full") throw new RangeError(`mode must be "diff" or "full", not ${JSON.stringify(mode)}`);
    return call(this.client.rpc.sb.branch({ id: this.id, tag: opts.tag ?? "", mode, wait: opts.wait ?? true }, this.client.opts()));
  }

  /** Kills the sandbox. Killing one that is already gone succeeds. */
  async kill(): Promise<void> {
    await call(this.client.rpc.sb.deleteSandbox({ id: this.id }, this.client.opts()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}

/** Sandboxes forked together. */
export class SandboxGroup extends Array<Sandbox> {
  // map/filter/slice of a group give plain arrays (a group of ids is no group of sandboxes).
  static override get [Symbol.species]() {
    return Array;
  }

  /** Kills every sandbox of the group; resolves to the ids killed. */
  async kill(): Promise<string[]> {
    if (this.length === 0) return [];
    return this[0]!.client.sandboxes.kill({ ids: this.map((s) => s.id) });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}

/** Output of a streaming exec. Iterate it once; afterwards `result` holds the exit. */
export class ExecStream implements AsyncIterable<OutputChunk> {
  result: ExecResult | undefined;
  private consumed = false;

  constructor(private readonly events: AsyncGenerator<ExecEvent>) {}

  async *[Symbol.asyncIterator](): AsyncGenerator<OutputChunk> {
    if (this.consumed) throw new ForkdError("an exec stream can be iterated only once");
    this.consumed = true;
    const out: Uint8Array[] = [];
    const err: Uint8Array[] = [];
    for await (const ev of this.events) {
      switch (ev.event.case) {
        case "stdout":
          out.push(ev.event.value);
          yield { stream: "stdout", data: ev.event.value };
          break;
        case "stderr":
          err.push(ev.event.value);
          yield { stream: "stderr", data: ev.event.value };
          break;
        case "exit":
          this.result = execResult(ev.event.value, decoder.decode(concat(out)), decoder.decode(concat(err)));
          break;
      }
    }
    if (this.result === undefined) throw new ForkdError("exec stream ended without an exit status");
  }

  /** Consumes the rest of the stream and resolves to the result. */
  async wait(): Promise<ExecResult> {
    for await (const _ of this) {
      // Draining: the output is collected into the result.
    }
    return this.result!;
  }
}

/**
 * Output of a process (`Sandbox.attach`): an async iterable of
 * `{ stream: "stdout" | "stderr" | "pty", data }`. `info` is the process as
 * it was when the stream began, `dropped` the bytes no longer buffered, and
 * `result` the exit, with the output this stream saw (PTY output in
 * `stdout`), once it has ended. Iteration may stop (break) and resume;
 * `cancel()` stops following the process without affecting it.
 */
export class ProcessStream implements AsyncIterable<ProcessChunk> {
  info: ProcessInfo | undefined;
  dropped = 0;
  result: ExecResult | undefined;
  private readonly pending: ProcessChunk[] = [];
  private readonly out: Uint8Array[] = [];
  private readonly err: Uint8Array[] = [];
  private readonly it: AsyncIterator<ExecEvent>;
  private done = false;

  constructor(
    events: AsyncIterable<ExecEvent>,
    private readonly abort: AbortController,
  ) {
    this.it = events[Symbol.asyncIterator]();
  }

  get pid(): number | undefined {
    return this.info?.pid;
  }

  private feed(ev: ExecEvent): void {
    const e = ev.event;
    switch (e.case) {
      case "stdout":
      case "stderr":
      case "pty":
        if (e.value.length) {
          (e.case === "stderr" ? this.err : this.out).push(e.value);
          this.pending.push({ stream: e.case, data: e.value });
        }
        break;
      case "started":
        this.info = processInfo(e.value);
        break;
      case "dropped":
        this.dropped += Number(e.value);
        break;
      case "exit":
        this.result = execResult(e.value, decoder.decode(concat(this.out)), decoder.decode(concat(this.err)));
        break;
    }
  }

  /** Reads one event; false once the stream has ended. The stream is read
   * to its very end, past the exit, so that the call completes. */
  private async event(): Promise<boolean> {
    if (this.done) return false;
    let r: IteratorResult<ExecEvent>;
    try {
      r = await this.it.next();
    } catch (e) {
      this.done = true;
      this.ended();
      throw toForkdError(e);
    }
    if (r.done) {
      this.done = true;
      this.ended();
      if (this.result === undefined) throw new ForkdError("process output ended without an exit status");
      return false;
    }
    this.feed(r.value);
    return true;
  }

  /** @internal The stream is over (for the request side of subclasses). */
  protected ended(): void {}

  /** @internal Reads until the process handle arrives; output stays queued. */
  async untilStarted(): Promise<void> {
    while (this.info === undefined && this.result === undefined) {
      if (!(await this.event())) return;
    }
  }

  /** The next chunk of output, or undefined once the process has exited. */
  async read(): Promise<ProcessChunk | undefined> {
    while (this.pending.length === 0) {
      if (!(await this.event())) return undefined;
    }
    return this.pending.shift();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<ProcessChunk> {
    for (;;) {
      const chunk = await this.read();
      if (chunk === undefined) return;
      yield chunk;
    }
  }

  /** Consumes the rest of the output and resolves to the exit. */
  async wait(): Promise<ExecResult> {
    while ((await this.read()) !== undefined) {
      // Draining: the output is collected into the result.
    }
    return this.result!;
  }

  /** Stops following the process (it keeps running). */
  cancel(): void {
    if (this.done) return;
    this.abort.abort();
    settle(this.it);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.cancel();
  }
}

/**
 * A command started with `Sandbox.execInteractive`: write to it with
 * `send`, `closeStdin`, `resize` and `signal`; read it as a ProcessStream
 * and `wait()` for the exit. `info` (and `pid`) is known from the start.
 * `close()` detaches: the process keeps running and can be attached again
 * by pid or tag.
 */
export class InteractiveProcess extends ProcessStream {
  private closed = false;

  constructor(
    events: AsyncIterable<ExecEvent>,
    abort: AbortController,
    private readonly outbox: Outbox<MessageInitShape<typeof ExecInputSchema>>,
  ) {
    super(events, abort);
  }

  private put(msg: MessageInitShape<typeof ExecInputSchema>): void {
    if (this.result !== undefined) throw new ForkdError("the process has exited");
    if (this.closed || this.outbox.closed) throw new ForkdError("the interactive session is closed");
    this.outbox.push(msg);
  }

  /** Writes to the process's stdin (its terminal, for a PTY); strings are UTF-8. */
  send(data: string | Uint8Array): void {
    for (const part of stdinChunks(data)) if (part.length) this.put({ input: { case: "stdin", value: part } });
  }

  /** Ends the process's stdin (it reads end of file). */
  closeStdin(): void {
    this.put({ input: { case: "eof", value: true } });
  }

  /** Sets the terminal size (PTY only). */
  resize(rows: number, cols: number): void {
    this.put({ input: { case: "resize", value: ptySize({ rows, cols }) } });
  }

  /** Signals the process's group: a number or a name ("INT", "TERM", ...). */
  signal(sig: string | number): void {
    this.put({ input: { case: "signal", value: signalArg(sig) } });
  }

  protected override ended(): void {
    this.outbox.close();
  }

  /** Detaches: stops the stream; the process keeps running. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.outbox.close();
    super.cancel();
  }

  /** The same as `close()`. */
  override cancel(): void {
    this.close();
  }

  override async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }
}

/**
 * File-system changes under a guest directory (`Sandbox.watch`): an endless
 * async iterable of FileEvent in the order they happened. Iteration may stop
 * (break) and resume; `close()` ends it.
 */
export class FileWatch implements AsyncIterable<FileEvent> {
  private readonly pending: FileEvent[] = [];
  private closed = false;

  constructor(
    private readonly it: AsyncIterator<FileEvents>,
    private first: Promise<IteratorResult<FileEvents>> | undefined,
    private readonly abort: AbortController,
    /** The watched directory. */
    readonly path: string,
  ) {}

  /** The next event; undefined once the watch is closed. */
  async read(): Promise<FileEvent | undefined> {
    while (this.pending.length === 0) {
      if (this.closed) return undefined;
      let r: IteratorResult<FileEvents>;
      try {
        const next = this.first ?? this.it.next();
        this.first = undefined;
        r = await next;
      } catch (e) {
        if (this.closed) return undefined;
        throw toForkdError(e);
      }
      if (r.done) return undefined;
      this.pending.push(...fileEvents(r.value, this.path));
    }
    return this.pending.shift();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<FileEvent> {
    for (;;) {
      const ev = await this.read();
      if (ev === undefined) return;
      yield ev;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.abort.abort();
    settle(this.it);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }
}

/** `sandbox.files`: the guest's filesystem (absolute paths). */
export class Files {
  constructor(private readonly sb: Sandbox) {}

  async read(path: string): Promise<Uint8Array> {
    const c = this.sb.client;
    const parts: Uint8Array[] = [];
    for await (const chunk of typed(c.rpc.sb.readFile({ id: this.sb.id, path }, c.opts()))) parts.push(chunk.data);
    return concat(parts);
  }

  async readText(path: string): Promise<string> {
    return decoder.decode(await this.read(path));
  }

  /** Writes the whole file (staged, then renamed into place); strings are UTF-8. */
  write(path: string, data: string | Uint8Array, mode = 0o644): Promise<FileInfo> {
    const c = this.sb.client;
    const blob = toBytes(data);
    const id = this.sb.id;
    async function* requests() {
      yield { id, path, mode, data: blob.subarray(0, WRITE_CHUNK) };
      for (let off = WRITE_CHUNK; off < blob.length; off += WRITE_CHUNK) {
        yield { data: blob.subarray(off, off + WRITE_CHUNK) };
      }
    }
    return call(c.rpc.sb.writeFile(requests(), c.opts()));
  }

  async list(path = "/"): Promise<FileInfo[]> {
    const c = this.sb.client;
    return (await call(c.rpc.sb.listFiles({ id: this.sb.id, path }, c.opts()))).entries;
  }

  stat(path: string): Promise<FileInfo> {
    const c = this.sb.client;
    return call(c.rpc.sb.statFile({ id: this.sb.id, path }, c.opts()));
  }

  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  async remove(path: string, opts: { recursive?: boolean } = {}): Promise<void> {
    const c = this.sb.client;
    await call(c.rpc.sb.removeFile({ id: this.sb.id, path, recursive: !!opts.recursive }, c.opts()));
  }
}

/** Options of `workspaces.create`: CreateWorkspaceRequest fields, camelCased. */
export interface WorkspaceOptions {
  memoryLimitMib?: number;
  cpuQuota?: number;
  network?: string;
  volumes?: string[];
  labels?: Record<string, string>;
  ttlSecs?: number;
  idleTimeoutSecs?: number;
}

/** `client.workspaces`: long-lived named sandboxes that suspend and resume. */
export class Workspaces {
  constructor(private readonly c: Client) {}

  create(name: string, snapshotTag: string, opts: WorkspaceOptions = {}): Promise<WorkspaceInfo> {
    return call(this.c.rpc.ws.createWorkspace({ ...opts, name, snapshotTag }, this.c.opts()));
  }

  get(name: string): Promise<WorkspaceInfo> {
    return call(this.c.rpc.ws.getWorkspace({ name }, this.c.opts()));
  }

  async list(): Promise<WorkspaceInfo[]> {
    return (await call(this.c.rpc.ws.listWorkspaces({}, this.c.opts()))).workspaces;
  }

  suspend(name: string): Promise<WorkspaceInfo> {
    return call(this.c.rpc.ws.suspendWorkspace({ name }, this.c.opts()));
  }

  resume(name: string): Promise<WorkspaceInfo> {
    return call(this.c.rpc.ws.resumeWorkspace({ name }, this.c.opts()));
  }

  delete(name: string): Promise<DeleteWorkspaceResult> {
    return call(this.c.rpc.ws.deleteWorkspace({ name }, this.c.opts()));
  }
}
