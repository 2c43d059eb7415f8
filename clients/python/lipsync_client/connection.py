"""Channels to a lipsync server: TLS / mutual TLS and bearer-token credentials, routing headers, and the one safe way
to open a request-streaming call."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc

from lipsync_client.headers import ACCEPTED_HEADER, MODEL_HEADER, WORKER_HEADER


def routing(model: str, metadata=None) -> tuple[tuple[str, str], ...]:
    """Call metadata with the routing key `x-model-id` (a proxy in front of several workers hashes on it, so a
    model's sessions meet on the worker that has it loaded), plus any `metadata` given."""
    return ((MODEL_HEADER, model), *tuple(metadata or ()))


async def worker_of(call) -> str:
    """The `x-lipsync-worker` response header of a call ("" if the server sent none)."""
    return next((str(v) for k, v in (await call.initial_metadata() or ()) if k == WORKER_HEADER), "")


@dataclass
class Credentials:
    """How a client proves itself: TLS (server CA, optional client certificate for mutual TLS) and/or a bearer
    token. Paths are PEM files; `tls` without `ca` trusts the system's roots."""
    token: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # the name to check the server certificate against, when dialling an IP
    insecure_token: bool = False    # send the token over plaintext to a host that is not this machine

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.ca or self.cert)

    def check_token_transport(self, target: str) -> None:
        """Refuse to send a bearer token in plaintext beyond this machine (anyone on the path could reuse it),
        unless told to (`insecure_token`, --allow-insecure-token)."""
        if self.token and not self.secure and not self.insecure_token and not is_local_target(target):
            raise ValueError(f"refusing to send the token in plaintext to {target}: use TLS (--tls or --tls-ca), or "
                             "pass --allow-insecure-token if the network is trusted")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key (and the key its certificate)")
        return grpc.ssl_channel_credentials(_read_pem(self.ca, "CA"), _read_pem(self.key, "client key"),
                                            _read_pem(self.cert, "client certificate"))


def is_local_target(target: str) -> bool:
    """Whether a gRPC target names this machine: loopback addresses, localhost or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.split("///", 1)[-1] if target.startswith(("dns:", "ipv4:", "ipv6:")) else target
    host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
        else host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def explain(exc: grpc.aio.AioRpcError, credentials: Credentials) -> str:
    """A failed call in one line, with the likely cause where the status alone misleads."""
    text = f"{exc.code().name}: {exc.details()}"
    dropped = exc.code() == grpc.StatusCode.UNAVAILABLE and \
        any(sign in (exc.details() or "") for sign in ("Socket closed", "Connection reset", "handshake", "SSL"))
    if dropped and not credentials.secure:
        text += " (the server may speak TLS: pass --tls or --tls-ca CA.pem)"
    elif dropped and not credentials.cert:
        text += (" (the server may require mutual TLS, a client certificate from its CA: pass --tls-cert C.pem "
                 "--tls-key K.pem)")
    return text


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"{what} not found: {file}")
    return file.read_bytes()


class _Bearer:
    """Adds `authorization: Bearer TOKEN` to every call's metadata."""

    def __init__(self, token: str):
        self.pair = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self.pair))


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


def _token_interceptors(token: str) -> list[_Bearer]:
    """One per call shape: grpc.aio sorts interceptors by type."""
    return [kind(token) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)]


def open_stream(method: Callable, requests: AsyncIterator, **kwargs):
    """Start a request-streaming call (Stream, Converse): the first message (the config) goes out at once, the
    rest only after the server has accepted the call, and none once the call has ended.

    grpc.aio reports a write that follows the server's final status as INTERNAL ("Internal error from Core")
    instead of that status (grpc/grpc#36066). The server answers an accepted stream with the header
    `lipsync-accepted` (config valid, model ready); a refusal before it (token, role, quota, config, model) is the
    status alone, so nothing is written after it and the client sees the real status."""
    call = None

    async def guarded() -> AsyncIterator:
        accepted = False
        async for message in requests:
            if call.done():
                return
            yield message
            if not accepted:
                metadata = await call.initial_metadata()
                if not any(key == ACCEPTED_HEADER for key, _ in (metadata or ())):
                    return  # refused: the status says why
                accepted = True
    call = method(guarded(), **kwargs)
    return call


def worker_lost(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed because the server (or, behind a proxy, the worker) serving it went away: start a new
    session. Directly that is UNAVAILABLE; Envoy resets a stream whose worker dies after it answered, which gRPC
    reports as INTERNAL "… RST_STREAM …"."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE or (
        exc.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (exc.details() or ""))


def channel(target: str, max_message_mb: int = 100, credentials: Credentials | None = None) -> grpc.aio.Channel:
    """A channel to a lipsync server: plaintext, or TLS/mutual TLS and a bearer token per `credentials`."""
    size = max_message_mb * 2**20
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    credentials = credentials or Credentials()
    credentials.check_token_transport(target)
    interceptors = _token_interceptors(credentials.token) if credentials.token else None
    if not credentials.secure:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if credentials.server_name:
        options.append(("grpc.ssl_target_name_override", credentials.server_name))
    return grpc.aio.secure_channel(target, credentials.channel_credentials(), options=options,
                                   interceptors=interceptors)
