"""`make gpu-rehearsal`: meet, on this machine's CPU, every import, collection and start-up the GPU run will meet.

A GPU host is lent rarely and briefly; a run that stops at `import hydra` wastes it. The rehearsal builds (once,
cached by the requirement list's digest) a Python 3.12 environment holding only the GPU host's packages that
lipsync meets (tools/gpu-image-requirements.txt), installs the device bundle into it exactly as `make gpu-check`
does (tools/gpu_bundle.py install), and runs:

  imports   the in-process GPU path (codec, model, runtime, api) imports on the bare image, without the bundle,
            and `pytest -m cuda` collects every CUDA test there with no error;
  steps     `benchmarks/gpu_check.py --rehearsal`: each gpu-check step on the CPU at the smallest sizes.

`--simulate` does the same in the current environment instead of a new one, with every package the GPU host
lacks made unimportable (a meta-path blocker in a sitecustomize on PYTHONPATH, inherited by every child process):
seconds, not minutes, so the test suite runs it (tests/test_gpu_rehearsal.py). It sees imports, not versions.

    python tools/gpu_rehearsal.py                       # the real thing (make gpu-rehearsal)
    python tools/gpu_rehearsal.py --simulate --steps imports,server
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_bundle  # noqa: E402

OUT = ROOT / "out" / "gpu-rehearsal"
REQUIREMENTS = ROOT / "tools" / "gpu-image-requirements.txt"
GPU_STEPS = ("tests", "server", "server-workers", "live", "server-square", "pipeline", "engines")
# what the in-process GPU path is: every module of these packages imports on the bare image (codec.video is
# PyAV's MP4 writer, which the GPU host lacks by choice and which says so when imported)
GPU_PATH = ("lipsync.codec", "lipsync.model", "lipsync.runtime", "lipsync.api")
NOT_GPU_PATH = ("lipsync.codec.video",)

BLOCKER = '''"""Written by tools/gpu_rehearsal.py: packages the GPU host lacks cannot be imported here."""
import importlib.abc
import sys

ABSENT = frozenset({names!r})


class _AbsentOnTheGpuHost(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (the GPU host does not have it: "
                                      f"{{'the device bundle' if {with_bundle!r} else 'the bare image'}} "
                                      f"rehearsal blocks it)", name=name)
        return None


sys.meta_path.insert(0, _AbsentOnTheGpuHost())
'''


def python312() -> str:
    """A Python 3.12 interpreter that runs (a pyenv shim on PATH may not): $REHEARSAL_PYTHON, python3.12 on PATH,
    pyenv's own installs."""
    candidates = [os.environ.get("REHEARSAL_PYTHON"), shutil.which("python3.12"),
                  *sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")),
                  "/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for candidate in filter(None, candidates):
        try:
            version = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version == "(3, 12)":
            return candidate
    raise SystemExit("the rehearsal needs a Python 3.12 interpreter (the GPU host's): put one on PATH as "
                     "python3.12 or set REHEARSAL_PYTHON")


def environment() -> Path:
    """The rehearsal's Python 3.12 venv with the image's packages; rebuilt only when the list changes."""
    venv = OUT / "venv"
    python = venv / "bin" / "python"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    stamp = venv / ".requirements"
    if python.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    started = time.perf_counter()
    print(f"building the rehearsal environment {venv} (Python 3.12 + {REQUIREMENTS.name}; minutes the first "
          "time, seconds from uv's cache)", flush=True)
    if Path(uv).is_file():
        subprocess.run([uv, "venv", "--quiet", "--seed", "--python", python312(), str(venv)], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "-r", str(REQUIREMENTS)],
                       check=True)
    else:
        subprocess.run([python312(), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(digest)
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return python


def blocker(with_bundle: bool, root: Path = OUT) -> Path:
    """A folder (under `root`) holding a sitecustomize that blocks what the GPU host lacks (with or without the
    bundle): put it first on PYTHONPATH."""
    folder = root / ("blocker-bundle" if with_bundle else "blocker-image")
    folder.mkdir(parents=True, exist_ok=True)
    names = gpu_bundle.blocked(with_bundle)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(names=sorted(names), with_bundle=with_bundle))
    return folder


def run(name: str, cmd: list[str], pythonpath: list[Path], simulated: bool = False) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    if simulated:  # pytest plugins of packages installed here but blocked (hydra's, …) must not load either
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    ok = done.returncode == 0
    tail = (done.stdout + done.stderr)[-4000:]
    print(tail, flush=True)
    print(f"== {name}: {'passed' if ok else f'FAILED (exit {done.returncode})'} in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return ok


IMPORTS = """
import importlib, pkgutil, sys
import lipsync
skip = set({skip!r})
names = []
for package in {packages!r}:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name not in skip:
            importlib.import_module(info.name)
            names.append(info.name)
print(f"{{len(names)}} modules of the in-process GPU path import on the bare image")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulate", action="store_true", help="in this environment, with what the GPU host "
                        "lacks blocked (seconds; what the test suite runs)")
    parser.add_argument("--steps", default="imports," + ",".join(GPU_STEPS),
                        help=f"some of: imports, {', '.join(GPU_STEPS)}")
    args = parser.parse_args()
    steps = args.steps.split(",")
    unknown = set(steps) - {"imports", *GPU_STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    source = [ROOT / "clients" / "python", ROOT]  # what the checkout brings: lipsync and lipsync_client
    if args.simulate:
        python, site = sys.executable, None
        bare, bundled = [blocker(False), *source], [blocker(True), *source]
    else:
        python = str(environment())
        site = OUT / "site"
        bare, bundled = source, [site, *source]
    ok = True
    if "imports" in steps:
        code = IMPORTS.format(packages=GPU_PATH, skip=NOT_GPU_PATH)
        ok &= run("imports (bare image)", [python, "-c", code], bare, args.simulate)
        ok &= run("cuda tests collect (bare image)",
                  [python, "-m", "pytest", "-q", "-m", "cuda", "--collect-only", "-p", "no:cacheprovider"], bare,
                  args.simulate)
    rest = [s for s in steps if s in GPU_STEPS]
    if rest:
        if site is not None:
            if not (gpu_bundle.WHEELS / gpu_bundle.MANIFEST).is_file():
                ok &= run("gpu-bundle", [sys.executable, str(ROOT / "tools" / "gpu_bundle.py"), "fetch"], [])
            ok &= run("install the bundle (as make gpu-check does)",
                      [python, str(ROOT / "tools" / "gpu_bundle.py"), "install", "--target", str(site)], [])
        ok &= run("gpu-check steps on the CPU",
                  [python, str(ROOT / "benchmarks" / "gpu_check.py"), "--rehearsal", "--steps", ",".join(rest)],
                  bundled, args.simulate)
    print("rehearsal passed" if ok else "rehearsal FAILED: the GPU run would stop where it did", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
