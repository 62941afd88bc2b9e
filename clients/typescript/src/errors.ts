// Typed errors for forkd's gRPC status codes.
//
// Every daemon error arrives as a gRPC status (a ConnectError here); the
// client rethrows it as one of these classes so callers can test
// `err instanceof NotFoundError` instead of comparing codes. `codeName` is
// the canonical name REST clients see in the `code` field of error bodies.

import { Code, ConnectError } from "@connectrpc/connect";

import type { EvalResult, ExecResult } from "./types.js";

const CODE_NAMES: Record<Code, string> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

/** The canonical name of `code` ("NOT_FOUND"), as REST error bodies carry it. */
export function codeName(code: Code): string {
  return CODE_NAMES[code];
}

/** The code of a canonical name ("NOT_FOUND"); undefined for an unknown name. */
export function codeOfName(name: string): Code | undefined {
  for (const [code, n] of Object.entries(CODE_NAMES)) if (n === name) return Number(code) as Code;
  return undefined;
}

/** Base class of every error the forkd client throws. */
export class ForkdError extends Error {
  /** The gRPC status code; undefined for errors raised by the client itself. */
  readonly code: Code | undefined;
  /** The daemon's explanation, without the code prefix. */
  readonly rawMessage: string;

  constructor(message: string, code?: Code, options?: { cause?: unknown }) {
    super(code === undefined ? message : `${CODE_NAMES[code]}: ${message}`, options);
    this.name = new.target.name;
    this.code = code;
    this.rawMessage = message;
  }

  /** "NOT_FOUND", "INVALID_ARGUMENT", ... ("" for client-side errors). */
  get codeName(): string {
    return this.code === undefined ? "" : CODE_NAMES[this.code];
  }
}

/** The snapshot, sandbox, workspace or guest file does not exist. */
export class NotFoundError extends ForkdError {}
/** The bearer token is missing or wrong (UNAUTHENTICATED). */
export class AuthenticationError extends ForkdError {}
/** The caller may not do this (PERMISSION_DENIED). */
export class PermissionDeniedError extends ForkdError {}
/** The request itself is wrong: a bad tag, path, count or option. */
export class InvalidArgumentError extends ForkdError {}
/** The request clashes with current state: ALREADY_EXISTS, FAILED_PRECONDITION or ABORTED. */
export class ConflictError extends ForkdError {}
/** A limit was hit: too many sandboxes, a file or body too large. */
export class ResourceExhaustedError extends ForkdError {}
/** This daemon does not implement the call or option yet. */
export class UnimplementedError extends ForkdError {}
/** The daemon cannot be reached, or is shutting down. */
export class UnavailableError extends ForkdError {}
/** The call (or a wait the client did on the caller's behalf) ran out of time. */
export class DeadlineExceededError extends ForkdError {}

/** A snapshot being created ended in status "failed". */
export class SnapshotFailedError extends ForkdError {
  constructor(
    readonly tag: string,
    readonly reason: string,
  ) {
    super(`snapshot "${tag}" failed: ${reason}`);
  }
}

/** A command or evaluation run with `check: true` did not succeed. */
export class CommandError extends ForkdError {
  constructor(
    message: string,
    readonly result: ExecResult | EvalResult,
  ) {
    super(message);
  }
}

type ErrorClass = new (message: string, code?: Code, options?: { cause?: unknown }) => ForkdError;

const BY_CODE: Partial<Record<Code, ErrorClass>> = {
  [Code.NotFound]: NotFoundError,
  [Code.Unauthenticated]: AuthenticationError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.OutOfRange]: InvalidArgumentError,
  [Code.AlreadyExists]: ConflictError,
  [Code.FailedPrecondition]: ConflictError,
  [Code.Aborted]: ConflictError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.Unimplemented]: UnimplementedError,
  [Code.Unavailable]: UnavailableError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
};

/** The class the client throws for `code`. */
export function errorClass(code: Code): ErrorClass {
  return BY_CODE[code] ?? ForkdError;
}

/** Converts anything thrown by a Connect call into a ForkdError. */
export function toForkdError(err: unknown): ForkdError {
  if (err instanceof ForkdError) return err;
  const ce = ConnectError.from(err);
  const Cls = errorClass(ce.code);
  return new Cls(ce.rawMessage, ce.code, { cause: err });
}
