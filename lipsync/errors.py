"""What can go wrong with a request, as exception types: each names the status a client gets.

Everything a client caused or must act on raises one of these (the protocol layer maps them to gRPC statuses in
one place); any other exception is a bug and is reported as INTERNAL.
"""
from __future__ import annotations

ECHO_LIMIT = 80  # characters of client input repeated in a message


def clip(text: object, limit: int = ECHO_LIMIT) -> str:
    """Client input as it may appear in messages and logs: repr'd and cut to `limit` characters."""
    shown = repr(text) if isinstance(text, str) else str(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(shown)} characters)"


class RequestError(Exception):
    """Base class: a request the server refuses. `status` is the gRPC status code's name."""
    status = "INTERNAL"


class InvalidRequest(RequestError, ValueError):
    """Malformed input: bad audio or format, out-of-range numbers, missing fields, protocol misuse."""
    status = "INVALID_ARGUMENT"


class NotFound(RequestError, KeyError):
    """An unknown model."""
    status = "NOT_FOUND"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class FailedPrecondition(RequestError, RuntimeError):
    """The request is valid but the server's state does not allow it (broken model files, model busy)."""
    status = "FAILED_PRECONDITION"


class ResourceExhausted(RequestError, RuntimeError):
    """Over a limit: queue, streams, sessions, audio length, message size, capacity."""
    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(RequestError, TimeoutError):
    """The client took too long (e.g. a stream's config message did not come in time)."""
    status = "DEADLINE_EXCEEDED"


class Unauthenticated(RequestError, PermissionError):
    """The caller's token is no longer accepted (revoked by a reload while its stream was open)."""
    status = "UNAUTHENTICATED"


class Unavailable(RequestError, RuntimeError):
    """The server is shutting down."""
    status = "UNAVAILABLE"


def status_of(exc: BaseException) -> tuple[str, str]:
    """(status name, message) for an exception: its own status if it is a RequestError, else INTERNAL."""
    if isinstance(exc, RequestError):
        return exc.status, str(exc)
    return "INTERNAL", f"internal error {incident(exc)} ({type(exc).__name__}); the server log has the details"


def incident(exc: BaseException) -> str:
    """A short reference that ties a client's INTERNAL message to the server's log line (which has the detail
    that clients never see: it may name server paths)."""
    return f"#{id(exc) & 0xFFFFFF:06x}"
