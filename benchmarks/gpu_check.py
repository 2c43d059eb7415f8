"""`make gpu-check`: on a CUDA machine, run the CUDA tests and the benchmarks; write what passed, what failed and
the figures as JSON (with the device name and the command) into benchmarks/results/.

    python benchmarks/gpu_check.py                       # every step
    python benchmarks/gpu_check.py --steps tests,engines  # some of them
    python benchmarks/gpu_check.py --results DIR          # write the JSON files elsewhere

The whole run fits one device call (`--budget`, 540 s by default: a lent GPU gives a session ~15 minutes, start-up
included): steps run in the order of what is needed most (the CUDA tests, then issue 22's server figures with the
pipeline beside them, the two-worker layout, live sessions, SQUARE output, the pipeline's batch sweep, the engine
alone), each with its budget stated (STEP_BUDGET_S); a step whose budget no longer fits is not started and is
recorded as not run. The servers compile three batch shapes, not seven (`SERVER_BUCKETS`), into one inductor cache
that every step shares.

Each step runs as its own process with a time limit, so one failing step never hides the others. The summary,
`gpu-check-<gpu>.json`, lists every step with its status, duration, command and the tail of its output, and for
the tests every CUDA test's outcome (a skipped test carries its reason, e.g. TensorRT not installed).

`--rehearsal` runs every step on the CPU at the smallest sizes (seconds each; results under out/gpu-rehearsal/):
`make gpu-rehearsal` does so in a Python 3.12 environment holding only the GPU host's packages and the device
bundle, so that whatever would stop the GPU run at an import, a collection or a start-up stops it here first.
"""
from __future__ import annotations

import argparse
import importlib.metadata
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
# Each step's budget (seconds), stated: a step starts only if its budget fits in what is left of the run's, and runs
# at most that long (the last to start may have the rest). The tests include tests/test_cuda_serving.py's servers and
# its compiled two-model server; the server steps each load a model and compile three batch shapes (from the shared
# inductor cache after the first), then run their points. Sums to 540 s: one device call.
STEP_BUDGET_S = {"tests": 200, "server": 90, "server-workers": 60, "live": 70, "server-square": 40, "pipeline": 30,
                 "engines": 50}
REHEARSAL_STEP_S = 120  # --rehearsal: each step on the CPU at the smallest sizes (seconds to a minute)
REHEARSAL_TESTS_S = 600  # … and the CUDA-serving tests' bodies run on the CPU: ~150 s quiet, 4 min seen under load


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def device_facts() -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    # what the run imports beside torch: each package's version, or why it is unavailable (the device bundle's among
    # them, so a summary says whether the bundle was installed)
    for module, dist in (("torchvision", "torchvision"), ("torchaudio", "torchaudio"),
                         ("torch_tensorrt", "torch-tensorrt"), ("tensorrt", "tensorrt"), ("grpc", "grpcio"),
                         ("google.protobuf", "protobuf"), ("onnxruntime", "onnxruntime"), ("hydra", "hydra-core"),
                         ("grpc_health.v1.health", "grpcio-health-checking"), ("simplejpeg", "simplejpeg"),
                         ("av", "av"), ("openvino", "openvino")):
        key = "protobuf" if dist == "protobuf" else module.split(".")[0]
        try:
            importlib.import_module(module)
            facts[key] = importlib.metadata.version(dist)
        except Exception as exc:  # not installed, or installed but broken
            facts[key] = f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"
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


def run_step(name: str, cmd: list[str], timeout_s: float, log_dir: Path, env: dict[str, str] | None = None) -> dict:
    """Run one step in a process group of its own: when it runs out of time, the whole group (a benchmark and the
    servers it spawned) is stopped, so no stray server holds the GPU for the next step."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    log_file = log_dir / f"gpu-check-{name}.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
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


# --rehearsal: the same steps on the CPU at the smallest sizes (the 160 variant at 320×180, eager engine, a
# second of audio, two streams or one session): seconds each, to prove every step starts, serves and writes
REHEARSAL_MODEL = ["--variant", "160", "--width", "320", "--height", "180", "--engine", "eager"]


def step_commands(py: str, tag: str, results: Path, logs: Path, args: argparse.Namespace,
                  rehearsal: bool = False) -> dict[str, list[str]]:
    """Each step's command line. The servers are sized for one device call: flat-out points only (live sessions
    measure real-time pacing), three compiled batch shapes. `rehearsal`: the same commands on the CPU, smallest."""
    xdist = importlib.util.find_spec("xdist") is not None  # the CUDA tests on 4 processes where pytest-xdist is
    device, kind = ("cpu", "rehearsal") if rehearsal else ("cuda", "cuda")
    seconds, live_seconds = ("1", "2") if rehearsal else ("4", "15")
    model = REHEARSAL_MODEL if rehearsal else []
    buckets = [] if rehearsal else [SERVER_BUCKETS]
    streams, sessions = ("2", "1") if rehearsal else (args.streams, args.sessions)
    server = [py, str(BENCH / "bench_server.py"), "--device", device, "--modes", "flat", "--seconds", seconds, *model]
    return {
        "tests": [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs",
                  *(["-n", "4", "--dist", "loadfile"] if xdist and not rehearsal else []),
                  f"--junitxml={logs / 'junit.xml'}"],
        "server": [*server, "--streams", streams, "--out", str(results / f"server-{kind}-{tag}.json"), *buckets],
        # another process layout: several full workers on the one GPU, the streams dealt to them in turn
        "server-workers": [*server, "--streams", streams, "--workers", str(args.workers), "--no-reference",
                           "--out", str(results / f"server-workers-{kind}-{tag}.json"), *buckets],
        # the server's session cap (64 by default) above the largest point, so that none is refused by it
        "live": [py, str(BENCH / "bench_live.py"), "--device", device, "--sessions", sessions, "--seconds",
                 live_seconds, *model, "--out", str(results / f"live-{kind}-{tag}.json"), *buckets,
                 f"server.live.max_sessions={2 * max(int(n) for n in sessions.split(','))}"],
        # the same server with SQUARE output: frames/s per GPU and bytes per frame the other way
        "server-square": [*server, "--streams", "2" if rehearsal else "16,48", "--output", "square",
                          "--no-reference", "--out", str(results / f"server-square-{kind}-{tag}.json"), *buckets],
        "pipeline": [py, str(BENCH / "bench_pipeline.py"), "--device", device,
                     "--batches", "2" if rehearsal else "8,32",
                     *(["--frames", "4", "--width", "320", "--height", "180", "--backend", "eager"] if rehearsal
                       else []), "--out", str(results / f"pipeline-{kind}-{tag}.json")],
        "engines": [py, str(BENCH / "bench_engines.py"), "--device", device,
                    "--backends", "eager:fp32" if rehearsal else "eager:fp16,compile+cudagraphs:fp16,tensorrt:fp16",
                    "--batches", "2" if rehearsal else "8,32", *(["--repeats", "1"] if rehearsal else []),
                    "--out", str(results / f"engines-{kind}-{tag}.json")],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--results", default=str(BENCH / "results"), help="where the JSON files go")
    parser.add_argument("--logs", default=str(ROOT / "out" / "gpu-check"), help="each step's full output")
    parser.add_argument("--step-timeout", type=float, default=900, help="seconds per step at most")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole run (default 540; 1500 with "
                        "--rehearsal): a step starts only if its own budget (STEP_BUDGET_S) fits in what is left")
    parser.add_argument("--streams", default="16,48,96", help="bench_server stream counts")
    parser.add_argument("--sessions", default="8,32,64,96", help="bench_live session counts")
    parser.add_argument("--workers", type=int, default=2, help="the server-workers layout: lipsync serve processes "
                        "on the one GPU")
    parser.add_argument("--rehearsal", action="store_true", help="every step on the CPU at the smallest sizes, "
                        "results under out/gpu-rehearsal/ (make gpu-rehearsal)")
    args = parser.parse_args()

    facts = device_facts()
    if args.rehearsal:  # and the CUDA tests that can run their bodies on the CPU do so (test_cuda_serving)
        os.environ["LIPSYNC_CUDA_TESTS_ON"] = "cpu"
        rehearsal = ROOT / "out" / "gpu-rehearsal"
        args.results = str(rehearsal / "results") if args.results == str(BENCH / "results") else args.results
        args.logs = str(rehearsal / "logs") if args.logs == str(ROOT / "out" / "gpu-check") else args.logs
    elif not facts["cuda_available"]:
        print("gpu-check needs a CUDA device; torch.cuda.is_available() is False here (`make gpu-rehearsal` runs "
              "its steps on the CPU)", file=sys.stderr)
        return 2
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.rehearsal else slug(facts["gpu"])
    commands = step_commands(sys.executable, tag, results, logs, args, args.rehearsal)
    args.budget = args.budget or (1500 if args.rehearsal else 540)
    # one inductor cache for every step: graphs compiled by the first (its servers' batch shapes) are loaded by the
    # next, not compiled again; engine decisions and exports share lipsync's engine cache the same way
    shared = {"TORCHINDUCTOR_CACHE_DIR": str(logs / "inductor-cache"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    names = args.steps.split(",")
    for name in names:
        if name not in commands:
            parser.error(f"unknown step {name!r}; expected some of {', '.join(STEPS)}")
    steps = []
    started = time.perf_counter()
    for k, name in enumerate(names):
        left = args.budget - (time.perf_counter() - started)
        need = (REHEARSAL_TESTS_S if name == "tests" else REHEARSAL_STEP_S) if args.rehearsal \
            else STEP_BUDGET_S[name]
        if need > left:  # it could not finish: not started (what it would measure is not half-measured)
            steps.append({"step": name, "budget_s": need, "command": " ".join(commands[name]),
                          "status": f"not run (its budget is {need} s and {left:.0f} s of the {args.budget:.0f} s "
                                    f"run were left; STEPS={name} runs it)"})
            continue
        timeout = left if k == len(names) - 1 else need  # the last step may use the rest
        steps.append({**run_step(name, commands[name], min(args.step_timeout, timeout), logs, shared),
                      "budget_s": need})
        if name == "tests":
            steps[-1]["tests"] = test_outcomes(logs / "junit.xml")
    summary = {"benchmark": "gpu-rehearsal" if args.rehearsal else "gpu-check",
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": facts, "budget_s": args.budget,
               "shared_caches": shared, "steps": steps,
               "targets": None if args.rehearsal else targets(results, tag)}
    out = results / f"{summary['benchmark']}-{tag}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    for step in steps:
        print(f"{step['step']:14s} {step['status']}")
    return 0 if all(s["status"] == "passed" or s["status"].startswith("not run") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
