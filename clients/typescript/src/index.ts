// @forkd/client: fork copy-on-write microVM sandboxes from warmed snapshots,
// run commands and Python in them, move files, branch and kill — over gRPC.
// `Controller` offers the reference forkd SDK's controller API over `Client`.

export {
  Client,
  DEFAULT_TOKEN_FILE,
  DEFAULT_URL,
  ExecStream,
  Files,
  FileWatch,
  InteractiveProcess,
  ProcessStream,
  Sandbox,
  SandboxGroup,
  Sandboxes,
  Snapshots,
  Workspaces,
  argv,
  isLoopbackUrl,
  parseUrl,
  processRef,
  ptySize,
  signalArg,
} from "./client.js";
export type {
  ClientOptions,
  CreateSnapshotOptions,
  ExecOptions,
  ForkOptions,
  InteractiveOptions,
  StartProcessOptions,
  WorkspaceOptions,
} from "./client.js";
export { Controller, ControllerError } from "./controller.js";
export type {
  ControllerBranchOptions,
  ControllerEvalResult,
  ControllerExecResult,
  ControllerOptions,
  ControllerPingResult,
  ControllerSandboxInfo,
  ControllerSnapshotInfo,
  ControllerSpawnOptions,
} from "./controller.js";
export {
  AuthenticationError,
  CommandError,
  ConflictError,
  DeadlineExceededError,
  ForkdError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  SnapshotFailedError,
  UnavailableError,
  UnimplementedError,
  codeName,
  codeOfName,
  errorClass,
  toForkdError,
} from "./errors.js";
export type * from "./types.js";
