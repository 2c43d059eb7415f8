"""What the light client costs a program that uses it: a fresh venv with only `clients/python` installed (no system
site-packages), its site-packages by distribution, the time `import lipsync_client` takes, and what the `[pipecat]`
and `[livekit]` extras add beyond the frameworks' own dependencies (a venv of the frameworks alone, then the client).

    python benchmarks/bench_client.py --out benchmarks/results/client-cpu.json

The venvs are made under out/bench_client/ with this interpreter and pip (its index and wheel cache); nothing of the
server is installed into them. tests/test_light_client.py uses the same helpers.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "python"
FRAMEWORKS = ["pipecat-ai==1.14.*", "livekit-agents==1.8.9"]  # the versions the client's extras pin
FORBIDDEN = ("torch", "torchvision", "torchaudio", "openvino", "onnxruntime", "tensorrt", "triton")
PACKAGING = {"pip", "setuptools", "wheel"}  # the venv's own tools, not counted

_SIZES = """
import importlib.metadata as md, json, os
sizes = {}
for dist in md.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    sizes[name] = sum(os.path.getsize(f) for f in (dist.locate_file(p) for p in dist.files or ()) if os.path.isfile(f))
print(json.dumps(sizes))
"""


def make_venv(path: Path) -> Path:
    """A new venv at `path` (replacing none: reused if there); returns its python."""
    python = path / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return python


def pip_install(python: Path, *requirements: str, fast: bool = False) -> float:
    """pip install into the venv; returns the seconds it took. `fast`: the same resolution by uv (from PyPI, its
    wheel cache hard-linked), when this interpreter's environment has it — the tests' way; the figures of this
    benchmark are pip's, as a user installs."""
    start = time.perf_counter()
    uv = Path(sys.executable).parent / "uv"
    command = [str(uv), "pip", "install", "--quiet", "--python", str(python)] if fast and uv.is_file() else \
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run = subprocess.run([*command, *requirements], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n{(run.stdout + run.stderr)[-4000:]}")
    return time.perf_counter() - start


def distributions(python: Path) -> dict[str, int]:
    """Bytes on disk of each installed distribution (its RECORD's files, compiled bytecode included)."""
    run = subprocess.run([str(python), "-I", "-c", _SIZES], check=True, capture_output=True, text=True)
    return json.loads(run.stdout)


def heavy(sizes: dict[str, int]) -> list[str]:
    """What must not be in a light client's venv: the GPU/ML runtimes and any CUDA libraries."""
    return sorted(n for n in sizes if n in FORBIDDEN or n.startswith("nvidia-"))


def counted_mb(sizes: dict[str, int]) -> float:
    return round(sum(v for k, v in sizes.items() if k not in PACKAGING) / 2**20, 1)


def import_seconds(python: Path, module: str = "lipsync_client", runs: int = 5) -> float:
    """Median wall time of `import module` in a fresh interpreter, less the bare interpreter's start."""
    def once(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([str(python), "-I", "-c", code], check=True)
        return time.perf_counter() - start
    bare = sorted(once("pass") for _ in range(runs))[runs // 2]
    return round(sorted(once(f"import {module}") for _ in range(runs))[runs // 2] - bare, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--work", default=str(ROOT / "out" / "bench_client"))
    args = parser.parse_args()
    work = Path(args.work)
    if work.exists():
        import shutil
        shutil.rmtree(work)
    light = make_venv(work / "light")
    install_s = pip_install(light, str(CLIENT))
    base = distributions(light)
    frameworks = make_venv(work / "frameworks")
    frameworks_s = pip_install(frameworks, *FRAMEWORKS)
    before = distributions(frameworks)
    pip_install(frameworks, f"{CLIENT}[pipecat,livekit]")
    after = distributions(frameworks)
    added = {k: v for k, v in after.items() if k not in before}
    result = {
        "python": platform.python_version(), "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client": {"site_packages_mb": counted_mb(base), "install_s": round(install_s, 1),
                   "import_lipsync_client_s": import_seconds(light), "heavy": heavy(base),
                   "distributions_mb": {k: round(v / 2**20, 2) for k, v in sorted(base.items(), key=lambda x: -x[1])
                                        if k not in PACKAGING}},
        "extras": {"frameworks": FRAMEWORKS, "frameworks_site_packages_mb": counted_mb(before),
                   "frameworks_install_s": round(frameworks_s, 1),
                   "added_by_client_mb": counted_mb(added),
                   "added_distributions_mb": {k: round(v / 2**20, 2) for k, v in added.items()}},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
