"""`lipsync serve`: its command line (run, or `--check` the configuration and the declared models' files), and
`spawn`, which starts it in a child process for the demo, the benchmarks and the tests."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import subprocess
import sys

from lipsync import logs
from lipsync.apps.options import command_parser

log = logging.getLogger("lipsync.api.server")


def spawn(overrides: list[str], cwd: str | None = None, log_file=None):
    """Start `lipsync serve` in a child process on a free port; returns (process, port) once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", "server.port=0",
                             *overrides], stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=cwd)
    match = re.match(r"READY port=(\d+)", proc.stdout.readline())
    if not match:
        raise RuntimeError(f"lipsync serve failed to start (exit {proc.wait()})")
    return proc, int(match.group(1))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "serve")
    p.epilog = ("settings: every key of conf/ with its default and what is allowed is in docs/settings.md; set any "
                "of them as KEY=VALUE (server.port=50100 registry.max_models=4 engine=eager)")
    p.add_argument("--check", action="store_true", help="validate the configuration and every declared model's "
                                                        "files, then exit (0: all good)")
    p.add_argument("overrides", nargs="*", help="hydra overrides of conf/config.yaml")
    p.set_defaults(func=run_serve)


def event_loop(name: str) -> asyncio.Runner:
    """A runner on the configured loop (`server.event_loop`); uvloop is an optional dependency, checked here."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            from lipsync.config import ConfigError
            raise ConfigError("server.event_loop='uvloop': the uvloop package is not installed "
                              "(pip install -e '.[uvloop]' from a checkout)") from None
        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def run_serve(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from lipsync.api.server import ServeConfig, StartupError, check_models, prepare, serve
    from lipsync.config import ConfigError, load_config
    from lipsync.model.engines import cache_dir_problem

    try:
        cfg = load_config(args.overrides)
        config = ServeConfig.from_dict(cfg)
        logs.setup(config.logging.level, "json" if config.logging.json else args.log_format, config.logging.format)
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        if args.check:
            server_cfg, security, registry, _ = prepare(config)
            problems = check_models(registry, strict=False)
            warning = security.exposure_warning(server_cfg.host)
            cache = cache_dir_problem(config.engine.cache_dir)
            print(json.dumps({"security": f"warning: {warning}" if warning else "ok",
                              "engine_cache": cache or "ok",
                              "models": {n: problems.get(n, "ok") for n in registry.entries}}, indent=2))
            return 1 if problems or cache else 0
        with event_loop(config.server.event_loop) as runner:
            runner.run(serve(config))
    except (StartupError, ConfigError) as exc:
        print(f"lipsync serve: {exc}", file=sys.stderr)
        return 2
    return 0
