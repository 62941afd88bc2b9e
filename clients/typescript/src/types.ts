// Value types returned by the client. Records (snapshots, sandboxes, files,
// workspaces, the version) are the generated protobuf-es messages, renamed so
// they do not clash with the client's handle classes; command and evaluation
// results are plain objects because callers branch on them constantly.

export type { Snapshot as SnapshotInfo, Sandbox as SandboxInfo, Workspace as WorkspaceInfo } from "./gen/forkd/v1/common_pb.js";
export type { FileInfo, Event, PingResponse as PingResult } from "./gen/forkd/v1/sandbox_pb.js";
export type {
  DeleteSnapshotResponse as DeleteSnapshotResult,
  PushSnapshotResponse as PushResult,
  RemoteSnapshot,
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
