// @forkd/client: fork copy-on-write microVM sandboxes from warmed snapshots,
// run commands and Python in them, move files, branch and kill — over gRPC.

export {
  Client,
  DEFAULT_TOKEN_FILE,
  DEFAULT_URL,
  ExecStream,
  Files,
  Sandbox,
  SandboxGroup,
  Sandboxes,
  Snapshots,
  Workspaces,
  argv,
  isLoopbackUrl,
  parseUrl,
} from "./client.js";
export type { ClientOptions, CreateSnapshotOptions, ExecOptions, ForkOptions, WorkspaceOptions } from "./client.js";
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
  errorClass,
  toForkdError,
} from "./errors.js";
export type * from "./types.js";
