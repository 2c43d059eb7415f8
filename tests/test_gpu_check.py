"""`make gpu-check`'s summary of issue 22's figures: computed from the benchmarks' own result files, and absent
(None), never guessed, where a step wrote nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def _write(root: Path, name: str, body: dict) -> None:
    (root / f"{name}-cuda-h200.json").write_text(json.dumps(body))


def test_targets_compare_the_server_with_its_pipeline(tmp_path):
    _write(tmp_path, "pipeline", {"results": [{"batch": 8, "fps": 800.0}, {"batch": 32, "fps": 1600.0}]})
    _write(tmp_path, "server", {"pipeline_reference": {"batch": 32, "fps": 1500.0}, "results": [
        {"paced": False, "fps": 1200.0, "server_cpu_ms_per_frame": {"event-loop": 0.2}},
        {"paced": False, "fps": 900.0, "server_cpu_ms_per_frame": {"event-loop": 0.1}},
        {"paced": True, "fps": 2000.0, "server_cpu_ms_per_frame": {"event-loop": 0.05}}]})
    got = gpu_check.targets(tmp_path, "h200")
    assert got["server_fps"] == 1200.0  # the best flat-out point; paced points do not count
    assert got["server_vs_pipeline"] == 0.75  # against the pipeline's best batch
    assert got["server_vs_pipeline_at_its_batch"] == 0.8  # against the same model at the server's own batch
    assert got["event_loop_cpu_ms_per_frame"] == 0.1
    assert got["live_sessions_real_time"] is None


def test_targets_without_results_are_none(tmp_path):
    got = gpu_check.targets(tmp_path, "h200")
    assert {k: v for k, v in got.items() if not k.endswith("_target")} == {
        "server_vs_pipeline": None, "server_vs_pipeline_at_its_batch": None, "server_fps": None,
        "live_sessions_real_time": None, "event_loop_cpu_ms_per_frame": None, "square_server_fps": None,
        "layout_server_fps": None, "best_layout": None,
        "square_jpeg_bytes_per_frame": None, "full_jpeg_bytes_per_frame": None}


def test_targets_put_square_output_beside_full_frames(tmp_path):
    _write(tmp_path, "server", {"results": [{"paced": False, "fps": 900.0, "jpeg_bytes_per_frame": 21000}]})
    _write(tmp_path, "server-square", {"results": [{"paced": False, "fps": 1100.0, "jpeg_bytes_per_frame": 1900},
                                                   {"paced": False, "fps": 1400.0, "jpeg_bytes_per_frame": 1850}]})
    got = gpu_check.targets(tmp_path, "h200")
    assert (got["square_server_fps"], got["square_jpeg_bytes_per_frame"], got["full_jpeg_bytes_per_frame"]) == \
        (1400.0, 1850, 21000)


def test_targets_compare_process_layouts(tmp_path):
    _write(tmp_path, "server", {"workers": 1, "results": [{"paced": False, "fps": 900.0, "workers": 1},
                                                          {"paced": True, "fps": 2500.0, "workers": 1}]})
    _write(tmp_path, "server-workers", {"workers": 2, "results": [{"paced": False, "fps": 1500.0, "workers": 2},
                                                                  {"paced": False, "fps": 1300.0, "workers": 2}]})
    got = gpu_check.targets(tmp_path, "h200")
    assert got["layout_server_fps"] == {"1 process": 900.0, "2 process": 1500.0}
    assert got["best_layout"] == "2 process" and got["server_fps"] == 900.0  # server_fps stays the one process's


def test_steps_fit_the_budget_and_are_sized_for_one_device_call(tmp_path):
    """Every step a run can name has a command; the servers compile three batch shapes and run flat out only;
    the layout step runs the workers asked for."""
    args = gpu_check.argparse.Namespace(streams="16,48", sessions="8,32", workers=3)
    commands = gpu_check.step_commands("python3", "h200", tmp_path, tmp_path, args)
    assert set(commands) == set(gpu_check.STEPS)
    for name in ("server", "server-workers", "server-square", "live"):
        assert gpu_check.SERVER_BUCKETS in commands[name], name
    assert commands["server-workers"][commands["server-workers"].index("--workers") + 1] == "3"
    assert all(c[c.index("--modes") + 1] == "flat" for n, c in commands.items() if n.startswith("server"))
    assert "server.live.max_sessions=64" in commands["live"]  # twice the largest point: none refused by the cap


def test_a_step_out_of_time_is_stopped_with_what_it_started(tmp_path):
    """A step that runs past its time is stopped with its whole process group: a server it spawned does not
    outlive it (it would hold the GPU through the next step)."""
    import os
    import time
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    row = gpu_check.run_step("sleepy", [sys.executable, "-c", script], 3, tmp_path)
    assert row["status"].startswith("timed out after 3 s")
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break  # a zombie: exited, waiting for init to reap it
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} outlived it")


def test_every_step_states_a_budget_and_they_fit_one_device_call():
    assert set(gpu_check.STEP_BUDGET_S) == set(gpu_check.STEPS)
    assert sum(gpu_check.STEP_BUDGET_S.values()) <= 540


def test_a_step_whose_budget_does_not_fit_is_not_started(tmp_path):
    """With 10 s left, a step whose budget is larger is recorded as not run (with the command that runs it) and
    nothing is started; the summary states the budget and the caches the steps share."""
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--rehearsal", "--budget", "10",
                           "--steps", "engines", "--results", str(tmp_path), "--logs", str(tmp_path / "logs")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu-rehearsal-cpu.json").read_text())
    (step,) = summary["steps"]
    assert step["status"].startswith("not run (its budget is") and "STEPS=engines" in step["status"]
    assert not (tmp_path / "logs" / "gpu-check-engines.log").exists()
    assert summary["budget_s"] == 10 and "TORCHINDUCTOR_CACHE_DIR" in summary["shared_caches"]
