// Value types returned by the client. Records (snapshots, sandboxes, files,
// workspaces, the version) are the generated protobuf-es messages, renamed so
// they do not clash with the client's handle classes; command and evaluation
// results, processes and file events are plain objects because callers
// branch on them constantly.

export type { Snapshot as SnapshotInfo, Sandbox as SandboxInfo, Workspace as WorkspaceInfo } from "./gen/forkd/v1/common_pb.js";
export type { FileInfo, Event, PingResponse as PingResult } from "./gen/forkd/v1/sandbox_pb.js";
export type {
  DeleteSnapshotResponse as DeleteSnapshotResult,
  PushSnapshotResponse as PushResult,
  RemoteSnapshot,
  Pool as PoolInfo,
} from "./gen/forkd/v1/snapshot_pb.js";
export type { VersionInfo } from "./gen/forkd/v1/system_pb.js";
export type { DeleteWorkspaceResponse as DeleteWorkspaceResult } from "./gen/forkd/v1/workspace_pb.js";

/** The outcome of a command run to completion in a sandbox. */
export interface ExecResult {
  stdout: string;
  stderr: string;
  /** Exit code, or -1 when a signal ended the command. */
  exitCode: number;
  /** Signal that ended the command (0 when it exited). */
  signal: number;
  /** True when the command was killed for running past its timeout. */
  timedOut: boolean;
  durationMs: number;
  /** exitCode is 0 and the command did not time out. */
  ok: boolean;
}

/** The outcome of evaluating Python in a sandbox's warm interpreter. */
export interface EvalResult {
  /** repr() of the last expression's value ("" for statements). */
  result: string;
  /** The exception and traceback; "" when the code ran without one. */
  error: string;
  exitCode: number;
  stdout: string;
  stderr: string;
  ok: boolean;
}

/** One piece of streamed command output. */
export interface OutputChunk {
  stream: "stdout" | "stderr";
  data: Uint8Array;
}

/** One piece of a process's output: "pty" for a process on a terminal
 * (its stdout and stderr together). */
export interface ProcessChunk {
  stream: "stdout" | "stderr" | "pty";
  data: Uint8Array;
}

/** A terminal size. Each is 1–1000. */
export interface PtySize {
  rows: number;
  cols: number;
}

/** A process of a sandbox, started with `startProcess` or `execInteractive`;
 * name it by `pid` or `tag` in later calls. */
export interface ProcessInfo {
  pid: number;
  /** The tag it was started with ("" for none). */
  tag: string;
  args: string[];
  cwd: string;
  /** Runs on a pseudo-terminal (its output arrives as "pty" chunks). */
  pty: boolean;
  /** Its stdin still accepts `sendStdin`. */
  stdinOpen: boolean;
  startedUnixMs: number;
  /** Output bytes produced so far, including those no longer buffered:
   * `attach(p, { fromOffset: p.outputBytes })` shows only new output. */
  outputBytes: number;
  running: boolean;
  /** How it ended (output not included); undefined while it runs. */
  exit: ExecResult | undefined;
}

/** A process: its pid, its tag (digits name a pid), or its ProcessInfo. */
export type ProcessRef = number | string | ProcessInfo;

/**
 * What happened to a path under a watched directory. "overflow": events were
 * lost at this point (a queue was full); `path` is the watched directory, to
 * be rescanned.
 */
export type FileEventKind = "create" | "write" | "remove" | "rename" | "chmod" | "overflow";

/** A change under a watched guest directory. */
export interface FileEvent {
  kind: FileEventKind;
  path: string;
  /** For "rename": the path it had before ("" otherwise). */
  from: string;
  isDir: boolean;
}
