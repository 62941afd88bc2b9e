"""Typed exceptions for forkd's gRPC status codes.

Every error the daemon returns arrives as a gRPC status; the client turns it
into one of these so callers can ``except forkd.NotFoundError`` instead of
comparing status codes. REST clients see the same codes in the ``code`` field
of the JSON error body, which is why each exception also carries that name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Type

import grpc

if TYPE_CHECKING:  # pragma: no cover
    from .types import ExecResult, EvalResult

__all__ = [
    "ForkdError",
    "NotFoundError",
    "AuthenticationError",
    "PermissionDeniedError",
    "InvalidArgumentError",
    "ConflictError",
    "ResourceExhaustedError",
    "UnimplementedError",
    "UnavailableError",
    "DeadlineExceededError",
    "SnapshotFailedError",
    "CommandError",
    "from_rpc_error",
]


class ForkdError(Exception):
    """Base class of every error raised by the forkd client.

    ``code`` is the gRPC status code (``None`` for errors raised by the client
    itself), ``code_name`` its canonical name as used in REST error bodies
    (``"NOT_FOUND"``), and ``message`` the daemon's explanation.
    """

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def code_name(self) -> str:
        return self.code.name if self.code is not None else ""

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}" if self.code is not None else self.message


class NotFoundError(ForkdError):
    """The snapshot, sandbox, workspace or guest file does not exist."""


class AuthenticationError(ForkdError):
    """The bearer token is missing or wrong (UNAUTHENTICATED)."""


class PermissionDeniedError(ForkdError):
    """The caller may not do this (PERMISSION_DENIED)."""


class InvalidArgumentError(ForkdError, ValueError):
    """The request itself is wrong: a bad tag, path, count or option."""


class ConflictError(ForkdError):
    """The request clashes with current state: ALREADY_EXISTS,
    FAILED_PRECONDITION (e.g. a snapshot that is not ready, an image not
    built) or ABORTED."""


class ResourceExhaustedError(ForkdError):
    """A limit was hit: too many sandboxes, a file or body too large."""


class UnimplementedError(ForkdError, NotImplementedError):
    """This daemon does not implement the call or option yet."""


class UnavailableError(ForkdError):
    """The daemon cannot be reached, or is shutting down."""


class DeadlineExceededError(ForkdError):
    """The call (or a wait the client did on the caller's behalf) ran out of time."""


class SnapshotFailedError(ForkdError):
    """A snapshot being created ended in status "failed"; ``reason`` says why."""

    def __init__(self, tag: str, reason: str) -> None:
        super().__init__(f"snapshot {tag!r} failed: {reason}")
        self.tag = tag
        self.reason = reason


class CommandError(ForkdError):
    """A command or evaluation run with ``check=True`` did not succeed; the
    full result is in ``result``."""

    def __init__(self, message: str, result: "ExecResult | EvalResult") -> None:
        super().__init__(message)
        self.result = result


_BY_CODE: Dict[grpc.StatusCode, Type[ForkdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_class(code: grpc.StatusCode) -> Type[ForkdError]:
    """The exception class the client raises for ``code``."""
    return _BY_CODE.get(code, ForkdError)


def from_rpc_error(err: grpc.RpcError) -> ForkdError:
    """Converts a grpc error (sync or asyncio) into the matching ForkdError."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else None
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return error_class(code)(details or str(err), code)
