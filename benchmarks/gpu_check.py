"""`make gpu-check`: on a CUDA machine, run the CUDA tests and the benchmarks; write what passed, what failed and
the figures as JSON (with the device name and the command) into benchmarks/results/.

    python benchmarks/gpu_check.py                       # every step
    python benchmarks/gpu_check.py --steps tests,engines  # some of them
    python benchmarks/gpu_check.py --results DIR          # write the JSON files elsewhere

The whole run fits one device call (`--budget`, 540 s by default: a lent GPU gives a session ~15 minutes, start-up
included): steps run in the order of what is needed most (the CUDA tests, then issue 22's server figures with the
pipeline beside them, the two-worker layout, live sessions, SQUARE output, the pipeline's batch sweep, the engine
alone), each within what is left of the budget, and a step that no longer
fits is recorded as not run. The servers compile three batch shapes, not seven (`SERVER_BUCKETS`).

Each step runs as its own process with a time limit, so one failing step never hides the others. The summary,
`gpu-check-<gpu>.json`, lists every step with its status, duration, command and the tail of its output, and for
the tests every CUDA test's outcome (a skipped test carries its reason, e.g. TensorRT not installed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
STEPS = ("tests", "server", "server-workers", "live", "server-square", "pipeline", "engines")  # most needed first
SERVER_BUCKETS = "engine.batch_buckets=[8,16,32]"  # the servers' compiled batch shapes: loads in ~1 min, not ~4
MIN_STEP_S = 45  # a step is started only with this much of the budget left (a server load alone takes ~30 s)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def device_facts() -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    for module in ("torchvision", "torchaudio", "torch_tensorrt", "tensorrt", "grpc", "onnxruntime"):
        try:
            facts[module] = __import__(module).__version__
        except Exception as exc:  # not installed, or installed but broken
            facts[module] = f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                  "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                  "multiprocessors": props.multi_processor_count}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            facts["driver"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return facts


def run_step(name: str, cmd: list[str], timeout_s: float, log_dir: Path) -> dict:
    """Run one step in a process group of its own: when it runs out of time, the whole group (a benchmark and the
    servers it spawned) is stopped, so no stray server holds the GPU for the next step."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    log_file = log_dir / f"gpu-check-{name}.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout_s)
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s (a benchmark keeps the points it finished)"
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
    text = log_file.read_text(errors="replace")
    print(text[-3000:], flush=True)
    print(f"== {name}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd),
            "output_tail": text[-4000:]}


def test_outcomes(junit: Path) -> list[dict]:
    if not junit.is_file():
        return []
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag in ("failure", "error") else "skipped"
                detail = (node.get("message") or "")[:500]
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time", 0)), **({"detail": detail} if detail else {})})
    return rows


def targets(results: Path, tag: str) -> dict:
    """Issue 22's figures from this run's result files, beside their targets (None where a step did not write its
    file): the server's frames/s against the pipeline's best, aggregate frames/s, real-time live sessions, the
    server's event-loop CPU per frame, and frames/s by process layout (one server process; K on the same GPU)."""
    def read(name: str) -> dict | None:
        path = results / f"{name}-cuda-{tag}.json"
        return json.loads(path.read_text()) if path.is_file() else None
    pipeline, server, live, square = read("pipeline"), read("server"), read("live"), read("server-square")
    workers = read("server-workers")
    best_pipeline = max((r["fps"] for r in pipeline["results"]), default=None) if pipeline else None
    flat = [r for r in server["results"] if not r["paced"]] if server else []
    best_server = max((r["fps"] for r in flat), default=None)
    loop_ms = [r["server_cpu_ms_per_frame"].get("event-loop") for r in flat if "server_cpu_ms_per_frame" in r]
    same_batch = (server or {}).get("pipeline_reference")  # bench_server's in-process run at the server's batch
    # process layouts: frames/s flat out of one server process, and of K worker processes on the same GPU
    layouts = {f"{r.get('workers', 1)} process": max(x["fps"] for x in r["results"] if not x["paced"])
               for r in (server, workers) if r and any(not x["paced"] for x in r["results"])}
    return {"server_vs_pipeline": round(best_server / best_pipeline, 3) if best_server and best_pipeline else None,
            "server_vs_pipeline_at_its_batch": round(best_server / same_batch["fps"], 3)
            if best_server and same_batch else None,
            "server_vs_pipeline_target": 0.9,
            "server_fps": best_server, "server_fps_target": 2000,
            "live_sessions_real_time": live["max_real_time_sessions"] if live else None, "live_sessions_target": 80,
            "layout_server_fps": layouts or None,
            "best_layout": max(layouts, key=layouts.get) if layouts else None,
            "event_loop_cpu_ms_per_frame": min((x for x in loop_ms if x is not None), default=None),
            # SQUARE output (each frame's generated square only): frames/s and JPEG bytes per frame, flat out
            "square_server_fps": max((r["fps"] for r in square["results"]), default=None) if square else None,
            "square_jpeg_bytes_per_frame": square["results"][-1].get("jpeg_bytes_per_frame")
            if square and square["results"] else None,
            "full_jpeg_bytes_per_frame": flat[-1].get("jpeg_bytes_per_frame") if flat else None}


def step_commands(py: str, tag: str, results: Path, logs: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """Each step's command line. The servers are sized for one device call: flat-out points only (live sessions
    measure real-time pacing), three compiled batch shapes."""
    xdist = importlib.util.find_spec("xdist") is not None  # the CUDA tests on 4 processes where pytest-xdist is
    server = [py, str(BENCH / "bench_server.py"), "--device", "cuda", "--modes", "flat", "--seconds", "4"]
    return {
        "tests": [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs",
                  *(["-n", "4", "--dist", "loadfile"] if xdist else []), f"--junitxml={logs / 'junit.xml'}"],
        "server": [*server, "--streams", args.streams, "--out", str(results / f"server-cuda-{tag}.json"),
                   SERVER_BUCKETS],
        # another process layout: several full workers on the one GPU, the streams dealt to them in turn
        "server-workers": [*server, "--streams", args.streams, "--workers", str(args.workers), "--no-reference",
                           "--out", str(results / f"server-workers-cuda-{tag}.json"), SERVER_BUCKETS],
        # the server's session cap (64 by default) above the largest point, so that none is refused by it
        "live": [py, str(BENCH / "bench_live.py"), "--device", "cuda", "--sessions", args.sessions, "--seconds", "15",
                 "--out", str(results / f"live-cuda-{tag}.json"), SERVER_BUCKETS,
                 f"server.live.max_sessions={2 * max(int(n) for n in args.sessions.split(','))}"],
        # the same server with SQUARE output: frames/s per GPU and bytes per frame the other way
        "server-square": [*server, "--streams", "16,48", "--output", "square", "--no-reference",
                          "--out", str(results / f"server-square-cuda-{tag}.json"), SERVER_BUCKETS],
        "pipeline": [py, str(BENCH / "bench_pipeline.py"), "--device", "cuda", "--batches", "8,32",
                     "--out", str(results / f"pipeline-cuda-{tag}.json")],
        "engines": [py, str(BENCH / "bench_engines.py"), "--device", "cuda",
                    "--backends", "eager:fp16,compile+cudagraphs:fp16,tensorrt:fp16",
                    "--batches", "8,32", "--out", str(results / f"engines-cuda-{tag}.json")],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--results", default=str(BENCH / "results"), help="where the JSON files go")
    parser.add_argument("--logs", default=str(ROOT / "out" / "gpu-check"), help="each step's full output")
    parser.add_argument("--step-timeout", type=float, default=900, help="seconds per step at most")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole run: each step gets what "
                        "is left, and none is started with less than MIN_STEP_S left")
    parser.add_argument("--streams", default="16,48,96", help="bench_server stream counts")
    parser.add_argument("--sessions", default="8,32,64,96", help="bench_live session counts")
    parser.add_argument("--workers", type=int, default=2, help="the server-workers layout: lipsync serve processes "
                        "on the one GPU")
    args = parser.parse_args()

    facts = device_facts()
    if not facts["cuda_available"]:
        print("gpu-check needs a CUDA device; torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    tag = slug(facts["gpu"])
    commands = step_commands(sys.executable, tag, results, logs, args)
    steps = []
    started = time.perf_counter()
    for name in args.steps.split(","):
        if name not in commands:
            parser.error(f"unknown step {name!r}; expected some of {', '.join(STEPS)}")
        left = args.budget - (time.perf_counter() - started)
        if left < MIN_STEP_S:
            steps.append({"step": name, "status": f"not run ({left:.0f} s of the {args.budget:.0f} s budget left; "
                                                  f"STEPS={name} runs it)", "command": " ".join(commands[name])})
            continue
        steps.append(run_step(name, commands[name], min(args.step_timeout, left), logs))
        if name == "tests":
            steps[-1]["tests"] = test_outcomes(logs / "junit.xml")
    summary = {"benchmark": "gpu-check", "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": facts, "steps": steps,
               "targets": targets(results, tag)}
    out = results / f"gpu-check-{tag}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    for step in steps:
        print(f"{step['step']:14s} {step['status']}")
    return 0 if all(s["status"] == "passed" or s["status"].startswith("not run") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
