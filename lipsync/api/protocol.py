"""The one wrapper of every RPC of both services. Exceptions become statuses by the one mapping
(`errors.status_of`), each call's final status is counted (`lipsync_requests`), failures are logged (INTERNAL with
its traceback, in the server log only). A LipSync call that fails ends with that status; the Go server's API
answers `success=false` with the same message instead (`unary(failure=...)`). Streaming calls hold a counted slot
while they run and can be ended by the server (idle client, revoked token) with the status of the reason.
Admission (tokens, roles) and the audit log are the interceptor's (`api.security`), before any of this."""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import grpc

from lipsync.api import metrics
from lipsync.api.security import Principal, principal, refuse
from lipsync.errors import DeadlineExceeded, InvalidRequest, ResourceExhausted, status_of

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from lipsync.api.server import Server

log = logging.getLogger("lipsync.api.server")

UnaryMethod = Callable[[Any, Any, grpc.aio.ServicerContext, float], Awaitable[Any]]
Failure = Callable[[str, float], Any]  # (message, elapsed ms) → the response a failed call answers with


class PreSerialized(grpc.aio.ServerInterceptor):
    """Responses of `methods` that a service already built as wire bytes (Stream's frames and live frames,
    `convert.stream_response_bytes` and `convert.live_frame_bytes`) go out as they are; any other response of
    theirs is serialized by its message type as usual."""

    def __init__(self, methods: set[str]):
        self.methods = methods

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method not in self.methods:
            return handler
        serialize = handler.response_serializer
        return handler._replace(response_serializer=lambda m: m if isinstance(m, bytes) else serialize(m))


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from exceptions to gRPC statuses (errors.RequestError subclasses carry their own)."""
    name, message = status_of(exc)
    return grpc.StatusCode[name], message


def _failed(rpc: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status of a failed call, logged (INTERNAL at ERROR with the traceback, the client's faults at INFO)."""
    code, message = grpc_status(exc)
    internal = code == grpc.StatusCode.INTERNAL
    (log.error if internal else log.info)("%s failed: %s %s", rpc, code.name, message, exc_info=internal)
    return code, message


def unary(method: UnaryMethod | None = None, *, name: str | None = None, failure: Failure | None = None):
    """Decorator of a unary RPC written as `method(self, request, context, started)`: a bad request never escapes
    as a crash. `name` labels its metric (default: the method's name)."""
    def wrap(method: UnaryMethod):
        rpc = name or method.__name__

        @functools.wraps(method)
        async def call(self, request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            try:
                response = await method(self, request, context, started)
            except asyncio.CancelledError:
                metrics.REQUESTS.labels(rpc, "CANCELLED").inc()
                raise
            except Exception as exc:
                code, message = _failed(rpc, exc)
                metrics.REQUESTS.labels(rpc, code.name).inc()
                if failure is not None:
                    return failure(message, (time.perf_counter() - started) * 1e3)
                await context.abort(code, message)
            metrics.REQUESTS.labels(rpc, "OK").inc()
            return response
        return call
    return wrap(method) if method is not None else wrap


def server_streaming(method: Callable[..., AsyncIterator]):
    """Decorator of a server-streaming RPC (one request, a stream of responses) written as an async generator
    `method(self, request, context)`, with `unary`'s status mapping and counting."""
    rpc = method.__name__

    @functools.wraps(method)
    async def call(self, request, context: grpc.aio.ServicerContext):
        async for response in _mapped(rpc, method(self, request, context), context):
            yield response
    return call


@dataclass(eq=False)
class OpenCall:
    """A streaming call in progress, which the server can end from outside with a status: idle too long, or its
    token revoked by a reload."""
    task: asyncio.Task
    who: Principal
    idle_timeout_s: float
    setting: str
    last_message: float = field(default_factory=time.monotonic)
    ended_by: Exception | None = None

    def end(self, reason: Exception) -> None:
        if self.ended_by is None:
            self.ended_by = reason
            self.task.cancel()


async def watched(requests: AsyncIterator, call: OpenCall) -> AsyncIterator:
    """The client's messages, each noted as activity of `call`. Once the client has said all it will (a Stream's
    end_of_audio, or its side closed) silence is no longer idleness: the call is finishing its work."""
    async for message in requests:
        call.last_message = time.monotonic()
        if message.WhichOneof("message") == "end_of_audio":
            call.idle_timeout_s = math.inf
        yield message
    call.idle_timeout_s = math.inf


async def first_config(requests: AsyncIterator, rpc: str, timeout_s: float):
    """The config of a streaming RPC: its first message, which must come within `timeout_s` (a connection that
    opens a stream and sends nothing must not hold a slot)."""
    try:
        first = await asyncio.wait_for(requests.__anext__(), timeout_s)
    except StopAsyncIteration:
        raise InvalidRequest(f"{rpc} closed before its config message") from None
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"no config message within {timeout_s:g} s of opening the {rpc} "
                               "(server.config_timeout_s)") from None
    if first.WhichOneof("message") != "config":
        raise InvalidRequest(f"the first {rpc} message must be `config`")
    return first.config


async def _mapped(rpc: str, body: AsyncIterator, context: grpc.aio.ServicerContext,
                  call: OpenCall | None = None) -> AsyncIterator:
    """A streaming RPC's responses, with `unary`'s status mapping and counting; a call the server ended
    (`OpenCall.end`) gets the status of its reason."""
    status = "OK"
    try:
        try:
            async for response in body:
                yield response
        except asyncio.CancelledError:
            if call is None or call.ended_by is None:
                raise
            raise call.ended_by from None
    except asyncio.CancelledError:
        status = "CANCELLED"
        raise
    except Exception as exc:
        code, message = _failed(rpc, exc)
        status = code.name
        await context.abort(code, message)
    finally:
        metrics.REQUESTS.labels(rpc, status).inc()


Body = Callable[[AsyncIterator, grpc.aio.ServicerContext], AsyncIterator]


async def streaming(rpc: str, server: Server, kind: str, gauge: Gauge, idle: tuple[float, str],
                    requests: AsyncIterator, context: grpc.aio.ServicerContext, body: Body) -> AsyncIterator:
    """A streaming RPC that holds one of the server's slots of its `kind` (streams | sessions) and one of its
    token's quota while it runs; it ends when its client is silent for `idle` (seconds, setting) or its token is
    revoked. `body(requests, context)` yields the responses."""
    who = principal()
    try:
        server.open_slot(kind, who)
    except ResourceExhausted as exc:
        metrics.REQUESTS.labels(rpc, "RESOURCE_EXHAUSTED").inc()
        await refuse(context, True, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), server.limits.config_timeout_s)
    gauge.inc()
    call = OpenCall(asyncio.current_task(), who, *idle)
    server.calls.add(call)
    try:
        async for response in _mapped(rpc, body(watched(requests, call), context), context, call):
            yield response
    finally:
        server.calls.discard(call)
        server.close_slot(kind, who)
        gauge.dec()
