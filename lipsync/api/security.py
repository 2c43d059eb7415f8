"""Who may call what: TLS credentials, bearer tokens with roles and quotas, and the interceptor that checks
every RPC before a service sees it. Certificates, keys and tokens are re-read by `reload()` (SIGHUP) without
touching open streams.

Tokens file: one `TOKEN ROLE[,ROLE] [name=LABEL] [streams=N] [sessions=N] [models=A,B]` per line, `#` starts a
comment; `models=` scopes a token to those models (every other one is NOT_FOUND for it, as if undeclared).
Roles: `infer` (rendering, live sessions, listing, stats, health), `metrics` (scraping /metrics) and `admin`
(everything, model loading too).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc

from lipsync.api import metrics
from lipsync.api.headers import WORKER_HEADER
from lipsync.config import Section, limit, setting
from lipsync.errors import ResourceExhausted

log = logging.getLogger(__name__)
audit_log = logging.getLogger("lipsync.audit")

ROLES = ("infer", "metrics", "admin")
ADMIN_METHODS = frozenset(f"/{service}/{rpc}" for service in ("lipsync.v1.LipSync", "monolithic.MonolithicService")
                          for rpc in ("LoadModel", "UnloadModel"))
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")


class SecurityConfigError(ValueError):
    """A TLS or token file that cannot be used, explained in one line with its full path."""


def _file(path: Any, what: str) -> Path | None:
    """A configured file path, resolved once; it must exist."""
    if path in (None, ""):
        return None
    file = Path(str(path)).expanduser().resolve()
    if not file.is_file():
        raise SecurityConfigError(f"{what} not found: {file}")
    return file


# --------------------------------------------------------------------------- principals and tokens
@dataclass(frozen=True)
class Principal:
    """The caller of an RPC: a token's name, roles and quotas (0 = only the server-wide limit)."""
    name: str
    roles: frozenset[str]
    streams: int = 0
    sessions: int = 0
    digest: bytes = field(default=b"", compare=False, repr=False)  # of its token (b"": no token checks)
    models: frozenset[str] | None = None  # the models it may use (None: every one)

    def quota(self, kind: str) -> int:
        return self.streams if kind == "streams" else self.sessions

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


ANONYMOUS = Principal("-", frozenset(ROLES))  # token checks off: every role, server-wide limits only
_current: ContextVar[Principal] = ContextVar("lipsync_principal", default=ANONYMOUS)


def principal() -> Principal:
    """The principal of the RPC being handled (set by the interceptor)."""
    return _current.get()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _bearer_token(value: str) -> str:
    """The token of an `authorization: Bearer TOKEN` value ("" for any other scheme)."""
    scheme, _, token = str(value).partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class TokenTable:
    """Tokens from `server.auth.tokens_file`, kept only as SHA-256 digests."""

    def __init__(self, path: Path, default_streams: int, default_sessions: int):
        self.path, self.default_streams, self.default_sessions = path, default_streams, default_sessions
        self.entries: list[tuple[bytes, Principal]] = self._parse()

    def _parse(self) -> list[tuple[bytes, Principal]]:
        entries: list[tuple[bytes, Principal]] = []
        names: set[str] = set()
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise SecurityConfigError(f"tokens file {self.path} cannot be read: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = f"{self.path}:{number}"
            if len(words) < 2:
                raise SecurityConfigError(f"{where}: expected `TOKEN ROLE[,ROLE] [name=LABEL] [streams=N] "
                                          "[sessions=N]`")
            token, roles = words[0], frozenset(words[1].split(","))
            if len(token) < 16:
                raise SecurityConfigError(f"{where}: tokens must be at least 16 characters")
            if not roles <= set(ROLES):
                raise SecurityConfigError(f"{where}: unknown role(s) {sorted(roles - set(ROLES))}; roles are "
                                          f"{', '.join(ROLES)}")
            options = {"name": f"token{number}", "streams": str(self.default_streams),
                       "sessions": str(self.default_sessions), "models": ""}
            for word in words[2:]:
                key, _, value = word.partition("=")
                if key not in options or not value:
                    raise SecurityConfigError(f"{where}: unknown option {word.split('=')[0]!r}; use name=, streams=, "
                                              "sessions=, models=")
                options[key] = value
            try:
                streams, sessions = int(options["streams"]), int(options["sessions"])
            except ValueError:
                raise SecurityConfigError(f"{where}: streams= and sessions= take whole numbers") from None
            if options["name"] in names:
                raise SecurityConfigError(f"{where}: the name {options['name']!r} is used twice")
            names.add(options["name"])
            if "admin" in roles:
                roles = frozenset(ROLES)
            digest = _digest(token)
            models = frozenset(m for m in options["models"].split(",") if m) or None
            entries.append((digest, Principal(options["name"], roles, max(streams, 0), max(sessions, 0), digest,
                                              models)))
        if not entries:
            raise SecurityConfigError(f"tokens file {self.path} has no tokens")
        return entries

    def reload(self) -> None:
        self.entries = self._parse()

    def accepts(self, who: Principal) -> bool:
        """Whether the token `who` was admitted with is still in the table (after a reload)."""
        return any(hmac.compare_digest(known, who.digest) for known, _ in self.entries)

    def lookup(self, token: str) -> Principal | None:
        """The token's principal; every entry is compared, in constant time each."""
        digest, found = _digest(token), None
        for known, who in self.entries:
            if hmac.compare_digest(known, digest):
                found = who
        return found


class ScrapeToken:
    """`server.metrics_token_file`: the one token a metrics scrape must send, kept as a SHA-256 digest."""

    def __init__(self, path: Path):
        self.path = path
        self.reload()

    def reload(self) -> None:
        try:
            token = self.path.read_text().strip()
        except OSError as exc:
            raise SecurityConfigError(f"metrics token file {self.path} cannot be read: {exc.strerror or exc}") \
                from None
        if not token:
            raise SecurityConfigError(f"metrics token file {self.path} is empty")
        self.digest = _digest(token)

    def allows(self, authorization: str) -> bool:
        """Whether an HTTP `Authorization` header carries the token (compared in constant time)."""
        return hmac.compare_digest(_digest(_bearer_token(authorization)), self.digest)


# --------------------------------------------------------------------------- settings
@dataclass
class TlsConfig(Section):
    """`server.tls`: TLS on the gRPC port (PEM files; re-read on SIGHUP)."""
    WHERE = "server.tls"
    cert: str | None = setting(None, "certificate chain")
    key: str | None = setting(None, "its private key")
    client_ca: str | None = setting(None, "set: mutual TLS, clients must present a certificate this CA signed")


@dataclass
class AuthConfig(Section):
    """`server.auth`: bearer tokens with roles and quotas."""
    WHERE = "server.auth"
    tokens_file: str | None = setting(None, "lines `TOKEN ROLE[,ROLE] [name=LABEL] [streams=N] [sessions=N] "
                                            "[models=A,B]` (roles: infer, metrics, admin; models=: the only models "
                                            "the token may use); clients send `authorization: Bearer TOKEN`; "
                                            "null = no token check. Re-read on SIGHUP")
    reflection: str = setting("open", "open | auth (server reflection needs a token)", choices=("open", "auth"))
    default_streams: int = limit(64, low=0, help="per-token quota of open Stream RPCs when a line has no streams= "
                                                 "(0 = server limit only)")
    default_sessions: int = limit(16, low=0, help="per-token quota of live sessions when a line has no sessions= "
                                                  "(0 = server limit only)")


# --------------------------------------------------------------------------- TLS
class TlsFiles:
    """`server.tls`: certificate chain and key (PEM), and optionally the CA that signs client certificates."""

    def __init__(self, cfg: TlsConfig | None = None):
        cfg = cfg or TlsConfig()
        self.cert = _file(cfg.cert, "server.tls.cert (certificate)")
        self.key = _file(cfg.key, "server.tls.key (private key)")
        self.client_ca = _file(cfg.client_ca, "server.tls.client_ca (client CA)")
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("server.tls.cert and server.tls.key go together: set both or neither")
        if self.client_ca and not self.cert:
            raise SecurityConfigError("server.tls.client_ca (mutual TLS) needs server.tls.cert and server.tls.key")
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.current = self._read() if self.cert else None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        """Read and validate the files (the key must match the certificate)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise SecurityConfigError(f"TLS certificate {self.cert} with key {self.key} cannot be used: "
                                      f"{getattr(exc, 'reason', None) or exc}") from None
        ca = None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise SecurityConfigError(f"client CA {self.client_ca} cannot be used: "
                                          f"{getattr(exc, 'reason', None) or exc}") from None
            ca = self.client_ca.read_bytes()
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())], ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificates `reload()` can swap; new connections get the new ones."""
        return grpc.dynamic_ssl_server_credentials(self.current, self._fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        return pending

    def reload(self) -> None:
        if self.enabled:
            self._pending = self.current = self._read()


# --------------------------------------------------------------------------- settings and reloading
@dataclass
class Security:
    """Everything `server.tls`, `server.auth` and `server.metrics_token_file` configure."""
    tls: TlsFiles
    tokens: TokenTable | None
    reflection_open: bool
    scrape: ScrapeToken | None = None
    metrics_open: bool = True  # scrapes need no token (server.metrics_auth)

    @classmethod
    def from_config(cls, tls: TlsConfig, auth: AuthConfig, metrics_auth: str = "auto",
                    metrics_token_file: str | None = None) -> "Security":
        """From the checked `server.tls`, `server.auth`, `server.metrics_auth` and `server.metrics_token_file`."""
        tokens_file = _file(auth.tokens_file, "server.auth.tokens_file (tokens)")
        tokens = TokenTable(tokens_file, auth.default_streams, auth.default_sessions) if tokens_file else None
        scrape_file = _file(metrics_token_file, "server.metrics_token_file (metrics token)")
        if metrics_auth == "token" and not (tokens or scrape_file):
            raise SecurityConfigError("server.metrics_auth=token needs server.auth.tokens_file (a token with the "
                                      "metrics role) or server.metrics_token_file")
        metrics_open = metrics_auth == "open" or (metrics_auth == "auto" and not (tokens or scrape_file))
        return cls(TlsFiles(tls), tokens, auth.reflection == "open",
                   ScrapeToken(scrape_file) if scrape_file else None, metrics_open)

    def scrape_allows(self, authorization: str) -> bool:
        """Whether a metrics scrape's `Authorization` header may read /metrics: the metrics token, or any token of
        the tokens file with the metrics role (admin has it)."""
        if self.metrics_open:
            return True
        if self.scrape is not None and self.scrape.allows(authorization):
            return True
        token = _bearer_token(authorization)
        who = self.tokens.lookup(token) if self.tokens is not None and token else None
        return who is not None and "metrics" in who.roles

    def still_valid(self, who: Principal) -> bool:
        """Whether a caller admitted earlier may go on (its token was not revoked by a reload)."""
        return self.tokens is None or not who.digest or self.tokens.accepts(who)

    def reload(self) -> None:
        """Re-read certificates, tokens and the metrics token; a broken file keeps the previous one."""
        for what, part in (("TLS files", self.tls), ("tokens", self.tokens), ("metrics token", self.scrape)):
            if part is None:
                continue
            try:
                part.reload()
                log.info("reloaded %s", what)
            except SecurityConfigError as exc:
                log.error("reload of %s failed, keeping the previous one: %s", what, exc)

    def exposure_warning(self, host: str) -> str | None:
        """A warning when the server is reachable beyond this machine without TLS or tokens."""
        if host in LOOPBACK_HOSTS:
            return None
        missing = [what for what, on in (("TLS (server.tls.cert/key)", self.tls.enabled),
                                         ("tokens (server.auth.tokens_file)", self.tokens is not None)) if not on]
        if not missing:
            return None
        return (f"listening on {host} without {' or '.join(missing)}: anyone who can reach this port can call every "
                "RPC, including LoadModel and UnloadModel")


# --------------------------------------------------------------------------- the interceptor
def _bearer(metadata: Any) -> str | None:
    """The bearer token of a call's metadata; "" if `authorization` has another form, None if it is absent."""
    for key, value in metadata or ():
        if key == "authorization":
            return _bearer_token(value)
    return None


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown"


def audit(event: str, context: grpc.aio.ServicerContext, **fields: Any) -> None:
    """One line in the audit log: what, who (token name, never the token) and from where."""
    audit_log.info(json.dumps({"event": event, "peer": _peer(context), "token": principal().name, **fields}))


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks each RPC's bearer token against the roles its method needs, sets the principal for the services,
    answers with the worker's name (`x-lipsync-worker`) and audits model loading and unloading.
    grpc.health.v1 is always open; reflection per configuration."""

    def __init__(self, security: Security, worker: str = "", first_message_s: float = 10.0):
        self.security, self.worker, self.first_message_s = security, worker, first_message_s

    def _needs(self, method: str) -> str | None:
        """The role a method needs; None: open to everyone."""
        if method.startswith(HEALTH_PREFIX):
            return None
        if method.startswith(REFLECTION_PREFIX):
            return None if self.security.reflection_open else "infer"
        return "admin" if method in ADMIN_METHODS else "infer"

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        role = self._needs(details.method)
        if handler is None or role is None:
            return handler
        streaming = handler.request_streaming
        return _wrap(handler, details.method, self.worker,
                     lambda context: self._admit(context, details.method, role, streaming))

    async def _admit(self, context: grpc.aio.ServicerContext, method: str, role: str, streaming: bool
                     ) -> Principal:
        tokens = self.security.tokens
        if tokens is None:
            return ANONYMOUS
        token = _bearer(context.invocation_metadata())
        who = tokens.lookup(token) if token else None
        rpc = method.rsplit("/", 1)[-1]
        if who is None:
            reason = "no token" if token is None else "malformed authorization" if not token else "unknown token"
            await self._refuse(context, method, streaming, reason, "-", grpc.StatusCode.UNAUTHENTICATED,
                               f"{reason}: send the metadata `authorization: Bearer TOKEN`" if token is None else
                               f"{reason}: the server does not accept this token")
        if role not in who.roles:
            await self._refuse(context, method, streaming, f"missing role {role}", who.name,
                               grpc.StatusCode.PERMISSION_DENIED, f"token {who.name!r} lacks the {role} role that "
                               f"{rpc} needs")
        return who

    async def _refuse(self, context, method: str, streaming: bool, reason: str, name: str, code: grpc.StatusCode,
                      message: str) -> None:
        metrics.AUTH_FAILURES.labels(code.name).inc()
        audit_log.warning(json.dumps({"event": "auth_failed", "method": method, "reason": reason, "token": name,
                                      "peer": _peer(context)}))
        await refuse(context, streaming, code, message, self.first_message_s)


async def refuse(context: grpc.aio.ServicerContext, streaming: bool, code: grpc.StatusCode, message: str,
                 first_message_s: float) -> None:
    """End a call with a status. A request-streaming call first takes the client's first message (its config;
    waiting at most `first_message_s`): grpc.aio clients report a status that overtakes their own first write
    as INTERNAL instead of that status."""
    if streaming:
        try:
            await asyncio.wait_for(context.read(), first_message_s)
        except Exception:  # none came, or the client went away: the status is all there is to send
            pass
    await context.abort(code, message)


def _wrap(handler: grpc.RpcMethodHandler, method: str, worker: str, admit: Callable) -> grpc.RpcMethodHandler:
    """The same handler, each call admitted first, unary-request calls answered at once with the worker header
    (request-streaming services send their headers once they accept the stream) and admin calls audited."""
    kind = ("stream_" if handler.request_streaming else "unary_") + ("stream" if handler.response_streaming
                                                                     else "unary")
    behavior = getattr(handler, kind)
    audited = method in ADMIN_METHODS
    headers = ((WORKER_HEADER, worker),) if worker and not handler.request_streaming else ()

    async def admitted(context) -> None:
        _current.set(await admit(context))
        if headers:
            await context.send_initial_metadata(headers)

    if inspect.isasyncgenfunction(behavior):
        async def call_stream(request, context):
            await admitted(context)
            async for response in behavior(request, context):
                yield response
        return handler._replace(**{kind: call_stream})

    async def call(request, context):
        await admitted(context)
        if not audited:
            return await behavior(request, context)
        started, outcome = time.perf_counter(), "error"
        try:
            response = await behavior(request, context)
            outcome = "ok" if getattr(response, "success", True) else "refused"
            return response
        finally:
            audit(method.rsplit("/", 1)[-1], context, model=getattr(request, "model_id", ""), outcome=outcome,
                  ms=round((time.perf_counter() - started) * 1e3, 1))
    return handler._replace(**{kind: call})


class Quotas:
    """Open streams and live sessions per token, against each token's quota."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, str], int] = {}

    def take(self, kind: str, who: Principal) -> None:
        """Take one of the principal's `kind` slots (streams | sessions) or refuse with RESOURCE_EXHAUSTED."""
        quota, key = who.quota(kind), (kind, who.name)
        if quota and self.open.get(key, 0) >= quota:
            raise ResourceExhausted(f"token {who.name!r} has {self.open[key]} {kind} open; its quota is {quota}")
        self.open[key] = self.open.get(key, 0) + 1

    def give_back(self, kind: str, who: Principal) -> None:
        key = (kind, who.name)
        self.open[key] -= 1
        if not self.open[key]:
            del self.open[key]
