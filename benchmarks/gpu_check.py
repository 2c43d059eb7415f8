"""`make gpu-check`: on a CUDA machine, run the CUDA tests and the benchmarks; write what passed, what failed and
the figures as JSON (with the device name and the command) into benchmarks/results/.

    python benchmarks/gpu_check.py                       # every step
    python benchmarks/gpu_check.py --steps tests,engines  # some of them
    python benchmarks/gpu_check.py --results DIR          # write the JSON files elsewhere

Each step runs as its own process with a time limit, so one failing step never hides the others. The summary,
`gpu-check-<gpu>.json`, lists every step with its status, duration, command and the tail of its output, and for
the tests every CUDA test's outcome (a skipped test carries its reason, e.g. TensorRT not installed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
STEPS = ("tests", "engines", "pipeline", "server", "server-square", "live")


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
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    log_file = log_dir / f"gpu-check-{name}.log"
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
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
    file): the server's frames/s against the pipeline's best, aggregate frames/s, real-time live sessions, and the
    server's event-loop CPU per frame."""
    def read(name: str) -> dict | None:
        path = results / f"{name}-cuda-{tag}.json"
        return json.loads(path.read_text()) if path.is_file() else None
    pipeline, server, live, square = read("pipeline"), read("server"), read("live"), read("server-square")
    best_pipeline = max((r["fps"] for r in pipeline["results"]), default=None) if pipeline else None
    flat = [r for r in server["results"] if not r["paced"]] if server else []
    best_server = max((r["fps"] for r in flat), default=None)
    loop_ms = [r["server_cpu_ms_per_frame"].get("event-loop") for r in flat if "server_cpu_ms_per_frame" in r]
    same_batch = (server or {}).get("pipeline_reference")  # bench_server's in-process run at the server's batch
    return {"server_vs_pipeline": round(best_server / best_pipeline, 3) if best_server and best_pipeline else None,
            "server_vs_pipeline_at_its_batch": round(best_server / same_batch["fps"], 3)
            if best_server and same_batch else None,
            "server_vs_pipeline_target": 0.9,
            "server_fps": best_server, "server_fps_target": 2000,
            "live_sessions_real_time": live["max_real_time_sessions"] if live else None, "live_sessions_target": 80,
            "event_loop_cpu_ms_per_frame": min((x for x in loop_ms if x is not None), default=None),
            # SQUARE output (each frame's generated square only): frames/s and JPEG bytes per frame, flat out
            "square_server_fps": max((r["fps"] for r in square["results"]), default=None) if square else None,
            "square_jpeg_bytes_per_frame": square["results"][-1].get("jpeg_bytes_per_frame")
            if square and square["results"] else None,
            "full_jpeg_bytes_per_frame": flat[-1].get("jpeg_bytes_per_frame") if flat else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--results", default=str(BENCH / "results"), help="where the JSON files go")
    parser.add_argument("--logs", default=str(ROOT / "out" / "gpu-check"), help="each step's full output")
    parser.add_argument("--step-timeout", type=float, default=900, help="seconds per step")
    parser.add_argument("--streams", default="1,8,16,32,48", help="bench_server stream counts")
    parser.add_argument("--sessions", default="1,4,8,16,32,48", help="bench_live session counts")
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
    py = sys.executable
    commands = {
        "tests": [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs",
                  f"--junitxml={logs / 'junit.xml'}"],
        "engines": [py, str(BENCH / "bench_engines.py"), "--device", "cuda",
                    "--backends", "eager:fp32,eager:fp16,compile:fp16,compile+cudagraphs:fp16,tensorrt:fp16",
                    "--batches", "1,8,32", "--out", str(results / f"engines-cuda-{tag}.json")],
        "pipeline": [py, str(BENCH / "bench_pipeline.py"), "--device", "cuda",
                     "--out", str(results / f"pipeline-cuda-{tag}.json")],
        "server": [py, str(BENCH / "bench_server.py"), "--device", "cuda", "--streams", args.streams,
                   "--out", str(results / f"server-cuda-{tag}.json")],
        # the same server with SQUARE output, flat out only: frames/s per GPU and bytes per frame the other way
        "server-square": [py, str(BENCH / "bench_server.py"), "--device", "cuda", "--streams", "16,48",
                          "--seconds", "4", "--modes", "flat", "--output", "square", "--no-reference",
                          "--out", str(results / f"server-square-cuda-{tag}.json")],
        # three compiled batch shapes instead of seven: the server loads in a minute, not four
        "live": [py, str(BENCH / "bench_live.py"), "--device", "cuda", "--sessions", args.sessions, "--seconds", "20",
                 "--out", str(results / f"live-cuda-{tag}.json"), "engine.batch_buckets=[8,16,32]"],
    }
    steps = []
    for name in args.steps.split(","):
        if name not in commands:
            parser.error(f"unknown step {name!r}; expected some of {', '.join(STEPS)}")
        if name == "live" and not (BENCH / "bench_live.py").is_file():
            steps.append({"step": name, "status": "not available (benchmarks/bench_live.py does not exist yet)"})
            continue
        steps.append(run_step(name, commands[name], args.step_timeout, logs))
        if name == "tests":
            steps[-1]["tests"] = test_outcomes(logs / "junit.xml")
    summary = {"benchmark": "gpu-check", "command": " ".join([Path(py).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": facts, "steps": steps,
               "targets": targets(results, tag)}
    out = results / f"gpu-check-{tag}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    for step in steps:
        print(f"{step['step']:10s} {step['status']}")
    return 0 if all(s["status"] == "passed" or s["status"].startswith("not available") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
