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
        "square_jpeg_bytes_per_frame": None, "full_jpeg_bytes_per_frame": None}


def test_targets_put_square_output_beside_full_frames(tmp_path):
    _write(tmp_path, "server", {"results": [{"paced": False, "fps": 900.0, "jpeg_bytes_per_frame": 21000}]})
    _write(tmp_path, "server-square", {"results": [{"paced": False, "fps": 1100.0, "jpeg_bytes_per_frame": 1900},
                                                   {"paced": False, "fps": 1400.0, "jpeg_bytes_per_frame": 1850}]})
    got = gpu_check.targets(tmp_path, "h200")
    assert (got["square_server_fps"], got["square_jpeg_bytes_per_frame"], got["full_jpeg_bytes_per_frame"]) == \
        (1400.0, 1850, 21000)
