"""The device bundle: the wheels a GPU host without network needs beside its own image to run `make gpu-check`.

The GPU host lipsync is checked on (docs/install.md#a-gpu-host-without-network) has Python 3.12, torch 2.11 and
many packages (IMAGE below), no network, and receives files only with the checkout (64 MiB a call, the checkout
included). Which of lipsync's own dependencies it lacks is derived here from pyproject.toml, never kept by hand:
lipsync's runtime dependencies and theirs, as this environment resolved them, less what the image has, less what
the GPU path does not use (LEFT_OUT, each with its reason). The result is committed as tools/gpu-bundle.txt (a
test checks it is what this script derives), downloaded on a machine with network as cp312 manylinux wheels, and
installed on the GPU host into a folder of its own on PYTHONPATH (the image's site-packages stay untouched).

    python tools/gpu_bundle.py write                  # derive tools/gpu-bundle.txt from pyproject.toml
    python tools/gpu_bundle.py check                  # exit 1 if the committed list is not what is derived
    python tools/gpu_bundle.py fetch                  # download the wheels into .whl/ (`make gpu-bundle`)
    python tools/gpu_bundle.py install --target DIR   # install .whl/ into DIR, offline (`make gpu-check`)
    python tools/gpu_bundle.py blocked                # import names of what a GPU host lacks even with the bundle
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "tools" / "gpu-bundle.txt"
WHEELS = ROOT / ".whl"
MANIFEST = "bundle.json"
BUDGET_MIB = 24  # the checkout (~34 MiB with the demo model) and the bundle share the 64 MiB a device call carries
PYTHON, PLATFORMS = "3.12", ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64",
                             "manylinux_2_34_x86_64")

# What the GPU host's image has (distribution names as pip lists them; read 2026-11, with Python 3.12.3 and
# torch 2.11.0+cu130). tools/gpu-image-requirements.txt is the part of it a rehearsal installs.
IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())

# lipsync dependencies the GPU path does without, and why (importing them there must not be needed either: the
# rehearsal runs with them blocked).
LEFT_OUT = {
    "av": "MP4 writing and compressed audio input only (render --out, client --out): ~30 MB of FFmpeg",
    "openvino": "a CPU engine (engine.backend=openvino); a GPU host serves with eager/compile/TensorRT",
    "nncf": "int8 quantization for the OpenVINO CPU engine",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> tuple[str, str]:
    """'hydra-core>=1.3; extra == "x"' → ('hydra-core', 'extra == "x"')."""
    spec, _, marker = requirement.partition(";")
    return canonical(re.match(r"\s*([A-Za-z0-9_.\-]+)", spec).group(1)), marker.strip()


def _applies(marker: str) -> bool:
    """Whether a dependency's environment marker holds on the GPU host (Linux x86_64, CPython 3.12, no extras)."""
    if not marker:
        return True
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate({"python_version": PYTHON, "python_full_version": PYTHON + ".3",
                                    "sys_platform": "linux", "platform_system": "Linux",
                                    "platform_machine": "x86_64", "implementation_name": "cpython",
                                    "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""})


def derive() -> list[str]:
    """`name==version` of every wheel the bundle holds: lipsync's runtime dependencies (pyproject.toml) and
    theirs, at the versions installed here, less the image's and LEFT_OUT, in name order."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [_requirement_name(r)[0] for r in project["dependencies"]]
    seen: set[str] = set()
    bundle: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name in seen or name in IMAGE or name in LEFT_OUT:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is a dependency but is not installed here: run `make setup` first") from None
        bundle[name] = dist.version
        for requirement in dist.requires or []:
            dep, marker = _requirement_name(requirement)
            if _applies(marker):
                todo.append(dep)
    return [f"{name}=={bundle[name]}" for name in sorted(bundle)]


def listed() -> list[str]:
    return [line.split("#")[0].strip() for line in LIST.read_text().splitlines()
            if line.split("#")[0].strip()]


def write() -> None:
    header = ("# The device bundle: lipsync's dependencies the GPU host's image lacks (derived by tools/gpu_bundle.py "
              "from\n# pyproject.toml; do not edit: `python tools/gpu_bundle.py write`). Left out on purpose:\n" +
              "".join(f"#   {name}: {why}\n" for name, why in LEFT_OUT.items()))
    LIST.write_text(header + "".join(f"{line}\n" for line in derive()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(dest: Path) -> int:
    """Download every listed wheel for CPython 3.12 on manylinux x86_64 into `dest` (a pure-Python project that
    publishes only a source archive is built into its wheel here); write the manifest; refuse a bundle over
    BUDGET_MIB."""
    dest.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    wheels: dict[str, str] = {}
    for requirement in listed():
        name = canonical(requirement.split("==")[0])
        before = set(dest.glob("*.whl"))
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                              "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp312", *platform_args,
                              "--dest", str(dest), requirement], capture_output=True, text=True)
        if got.returncode != 0:  # no wheel on the index: build it here, and keep it only if it is pure Python
            with tempfile.TemporaryDirectory() as tmp:
                built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                                        "--wheel-dir", tmp, requirement], capture_output=True, text=True)
                made = list(Path(tmp).glob("*-py3-none-any.whl")) + list(Path(tmp).glob("*-py2.py3-none-any.whl"))
                if built.returncode != 0 or not made:
                    print(f"cannot bundle {requirement}: no cp312 manylinux wheel, and no pure-Python wheel builds "
                          f"from its source\n{got.stderr[-800:]}{built.stderr[-800:]}", file=sys.stderr)
                    return 1
                shutil.copy(made[0], dest / made[0].name)
        found = [p for p in dest.glob("*.whl") if canonical(p.name.split("-")[0]) == name]
        new = (set(dest.glob("*.whl")) - before) or set(found)
        wheel = max(new, key=lambda p: p.stat().st_mtime)
        wheels[requirement] = wheel.name
    for stale in set(dest.glob("*.whl")) - {dest / w for w in wheels.values()}:
        stale.unlink()
    total = sum((dest / w).stat().st_size for w in wheels.values())
    manifest = {"python": PYTHON, "platforms": list(PLATFORMS), "bytes": total,
                "wheels": [{"requirement": r, "file": w, "sha256": _sha256(dest / w)} for r, w in wheels.items()]}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest} (budget {BUDGET_MIB} MiB): carry it with the "
          f"checkout and run `make gpu-check NO_SETUP=1 PY=python3` on the GPU host")
    if total > BUDGET_MIB * 2**20:
        print(f"the bundle is over its budget of {BUDGET_MIB} MiB", file=sys.stderr)
        return 1
    return 0


def install(source: Path, target: Path) -> int:
    """Install the bundle into `target` without network, checking each wheel against the manifest (and the
    manifest against tools/gpu-bundle.txt); does nothing when `target` already holds this very bundle."""
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        print(f"no device bundle in {source}: run `make gpu-bundle` on a machine with network and carry "
              f"{source.name}/ with the checkout", file=sys.stderr)
        return 1
    manifest = json.loads(manifest_path.read_text())
    if sorted(w["requirement"] for w in manifest["wheels"]) != sorted(listed()):
        print(f"{source}/ holds another bundle than tools/gpu-bundle.txt lists: run `make gpu-bundle` again",
              file=sys.stderr)
        return 1
    for wheel in manifest["wheels"]:
        path = source / wheel["file"]
        if not path.is_file() or _sha256(path) != wheel["sha256"]:
            print(f"{path} is missing or not the file the bundle was made with: run `make gpu-bundle` again",
                  file=sys.stderr)
            return 1
    stamp = target / ".bundle.json"
    if stamp.is_file() and stamp.read_text() == manifest_path.read_text():
        return 0
    shutil.rmtree(target, ignore_errors=True)
    files = [str(source / w["file"]) for w in manifest["wheels"]]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--disable-pip-version-check", "--target", str(target), *files])
    if done.returncode != 0:
        return done.returncode
    stamp.write_text(manifest_path.read_text())
    print(f"installed the device bundle ({len(files)} wheels) into {target}")
    return 0


def blocked(with_bundle: bool = True) -> list[str]:
    """Top-level import names of the distributions installed here that a GPU host lacks (with the bundle
    installed, or without): what a rehearsal in this environment blocks. lipsync and lipsync_client are not
    among them (they come with the checkout)."""
    have = IMAGE | ({canonical(r.split("==")[0]) for r in listed()} if with_bundle else set())
    names: set[str] = set()
    keep: set[str] = set()
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        tops = _top_levels(dist)
        (keep if name in have or name in ("lipsync", "lipsync-server", "lipsync-client") else names).update(tops)
    return sorted(names - keep - {"", "_distutils_hack", "__editable__", "google"})


def _top_levels(dist: metadata.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    tops = set()
    for file in dist.files or []:
        first = file.parts[0] if file.parts else ""
        if first.endswith((".dist-info", ".data")) or first in ("..", "bin") or first.startswith("__"):
            continue
        tops.add(first.removesuffix(".py") if first.endswith(".py") else first)
    return {t for t in tops if t.isidentifier()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("write", "check", "fetch", "install", "blocked", "list"))
    parser.add_argument("--dest", default=str(WHEELS), help="the bundle's folder (fetch, install)")
    parser.add_argument("--target", default=str(ROOT / "out" / "gpu-site"), help="where install puts it")
    parser.add_argument("--without-bundle", action="store_true", help="blocked: as the bare image")
    args = parser.parse_args()
    if args.command == "write":
        write()
        print(f"wrote {LIST.relative_to(ROOT)}: {', '.join(listed())}")
    elif args.command == "check":
        derived, committed = derive(), listed()
        if derived != committed:
            print(f"tools/gpu-bundle.txt is stale: derived {derived}, committed {committed}; run "
                  "`python tools/gpu_bundle.py write`", file=sys.stderr)
            return 1
    elif args.command == "list":
        print("\n".join(listed()))
    elif args.command == "fetch":
        return fetch(Path(args.dest))
    elif args.command == "install":
        return install(Path(args.dest), Path(args.target))
    elif args.command == "blocked":
        print("\n".join(blocked(not args.without_bundle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
