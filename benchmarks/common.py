"""Shared benchmark plumbing: fixed synthetic inputs, environment facts, JSON output."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipsync.model.demo import make_avatar, make_weights  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / "out" / "bench_assets"


class TensorOps(TorchDispatchMode):
    """Counts the tensor operations that do work, in this thread: every aten call but views. On a GPU each is a
    kernel launch its Python thread pays for, so a count per frame is host work a CPU can measure for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def assets(width: int = 1280, height: int = 720, frames: int = 24, variant: str = "328") -> dict[str, Path]:
    """Seeded weights of the SyncTalk_2D `variant` and a synthetic avatar at the benchmark resolution (made once,
    then reused)."""
    root = CACHE / f"{width}x{height}x{frames}"
    if not (root / "avatar" / "crop_rects.json").is_file():
        make_avatar(root / "avatar", frames, width, height)
    if not (root / f"generator_{variant}.pth").is_file():
        make_weights(root, variant, seed=0)
    return {"checkpoint": root / f"generator_{variant}.pth", "audio_encoder": root / "audio_visual_encoder.pth",
            "avatar": root / "avatar"}


def model_override(files: dict[str, Path], variant: str = "328", name: str = "bench") -> str:
    """The hydra override that declares the benchmark model (preloaded) for a `lipsync serve` child."""
    spec = ",".join(f"{k}:{v}" for k, v in files.items())
    return f"+models.{name}={{{spec},variant:'{variant}',preload:true}}"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (figures differ several-fold between the machines here)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MATH_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")  # what the engines use


def cpu_math() -> list[str]:
    """The vector and matrix instruction sets of this CPU that the CPU engines choose by (one "AMD EPYC" here has
    AVX2 only, another AVX-512 with bf16: their figures differ several-fold)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [m for m in MATH_FLAGS if m in flags]


def environment(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cpu_math": cpu_math(), "cpu_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path.resolve()}", file=sys.stderr)


def write_partial(result: dict, out: str | None) -> None:
    """The result so far, marked partial, written quietly after each point: a run stopped part-way (gpu-check's
    time budget) keeps the points it finished."""
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "partial": "stopped before its last point"}, indent=2) + "\n")


def figure(columns: int = 1, size: tuple[float, float] = (7, 4.5)):
    """A matplotlib figure (headless backend) with `columns` axes side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=size, squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, axes, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


# --------------------------------------------------------------------------- host CPU per thread of a server
def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds each thread of process `pid` has run, by thread id: (the OS's name for it, seconds). The
    process's main thread (tid == pid), where `lipsync serve` runs its event loop, is named "event-loop"."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                name = f.read().strip()
            try:
                with open(f"{base}/schedstat") as f:
                    seconds = int(f.read().split()[0]) / 1e9  # nanoseconds on the CPU
            except OSError:  # kernels without schedstat: clock ticks of user + system time
                with open(f"{base}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        threads[int(tid)] = ("event-loop" if int(tid) == pid else name, seconds)
    return threads


class ThreadCPU:
    """CPU the server processes spend per delivered frame, by thread name (summed over the processes: a layout of
    several workers on one device is one server), over one measured stretch: `with ThreadCPU(pid, ...) as cpu:
    ...run...`, then `cpu.per_frame_ms(frames)`."""

    def __init__(self, *pids: int):
        self.pids = pids
        self.before: dict[int, tuple[str, float]] = {}
        self.seconds: dict[str, float] = {}

    def _threads(self) -> dict[int, tuple[str, float]]:
        return {tid: row for pid in self.pids for tid, row in thread_cpu(pid).items()}  # thread ids are unique

    def __enter__(self) -> "ThreadCPU":
        self.before = self._threads()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = {}
        for tid, (name, seconds) in self._threads().items():
            used = seconds - self.before.get(tid, (name, 0.0))[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + used

    def per_frame_ms(self, frames: int) -> dict[str, float]:
        """Milliseconds of CPU per delivered frame, by thread name (threads of one name summed), most first, and
        their total."""
        rows = {name: 1e3 * s / max(frames, 1) for name, s in self.seconds.items() if s > 0}
        ordered = dict(sorted(((k, round(v, 4)) for k, v in rows.items()), key=lambda kv: -kv[1]))
        return {**ordered, "total": round(sum(rows.values()), 4)}
