"""lipsync: speech audio → lip-synced talking-head JPEG frames with SyncTalk_2D models, on CUDA or CPU.

The package is layered in the order data flows, each layer importing only from those below it (the import-linter
contract in pyproject.toml keeps it so):

    integrations   Pipecat and LiveKit services (the client package's, under these names)
    apps           command line, client command, browser bridge, local cluster, export, demo
    api            the gRPC services, their one call wrapper, proto conversions, limits, security, metrics
    runtime        registry, deadline scheduler, Stream and live sessions, in-process rendering
    model          audio features, networks, engines, avatars, compositing, the pipeline, the demo model
    codec          PCM/WAV decoding, resampling, JPEG, MP4
    config, errors, timebase, logs, _proto   (the foundation: typed settings, error types, the 25 fps clock,
                   how processes log, stubs)

Beside them, `lipsync_client` (clients/python, its own distribution without torch) holds the stubs, channels,
credentials and the client calls; the server imports the stubs and the header names from it, never the other way.

The module paths of the flat layout before it (`lipsync.audio`, `lipsync.pipeline`, `lipsync.client`, …) still
import, with a DeprecationWarning naming the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import time
import types
import warnings

__version__ = "0.1.0"
STARTED = time.monotonic()  # when this process first imported lipsync (`serve` logs its time to READY from it)

# old module path (flat layout) → its module(s) now; `audio` was split into decoding and features
MOVED = {
    "audio": ("codec.audio", "model.audio_features", "timebase"), "jpeg": ("codec.jpeg",),
    "video": ("codec.video",), "models": ("model.networks",), "engines": ("model.engines",),
    "autotune": ("model.autotune",), "avatar": ("model.avatar",), "compose": ("model.compose",),
    "pipeline": ("model.pipeline",), "demo": ("model.demo",), "presenter": ("model.presenter",),
    "scheduler": ("runtime.scheduler",), "registry": ("runtime.registry",), "streaming": ("runtime.streaming",),
    "live": ("runtime.live",), "render": ("runtime.render",), "server": ("api.server",), "compat": ("api.compat",),
    "limits": ("api.limits",), "security": ("api.security",), "metrics": ("api.metrics",), "cli": ("apps.cli",),
    "client": ("apps.client",), "web": ("apps.web.bridge",), "cluster": ("apps.cluster",),
    "demo_run": ("apps.demo_run",),
    "export": ("apps.export",), "export.cli": ("apps.export.cli",), "export.onnx_export": ("apps.export.onnx_export",),
    "export.tensorrt_export": ("apps.export.tensorrt_export",),
}


class _MovedLoader(importlib.abc.Loader):
    """Serves an old path as the module now at the new one (or, for a split module, one that holds the public
    names of all its parts)."""

    def __init__(self, old: str, new: tuple[str, ...]):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"lipsync.{self.old} moved to {' + '.join('lipsync.' + n for n in self.new)}",
                      DeprecationWarning, stacklevel=3)
        parts = [importlib.import_module(f"{__name__}.{n}") for n in self.new]
        if len(parts) == 1:
            return parts[0]
        merged = types.ModuleType(f"{__name__}.{self.old}", parts[0].__doc__)
        for part in reversed(parts):
            merged.__dict__.update({k: v for k, v in vars(part).items() if not k.startswith("__")})
        return merged

    def exec_module(self, module) -> None:
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{__name__}.")
        if old == fullname or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(old, MOVED[old]))


sys.meta_path.append(_MovedFinder())


def __getattr__(name: str) -> types.ModuleType:
    """`from lipsync import audio` (an old path) imports it through the finder above."""
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
