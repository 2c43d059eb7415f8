"""How processes log: text or JSON lines, other libraries quiet below WARNING, lines written around progress bars."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
from tqdm import tqdm

from lipsync import logs


@pytest.fixture
def stderr():
    """A stream for `logs.setup` to write to; lipsync's handler removed and the levels restored after."""
    buffer = io.StringIO()
    root, ours = logging.getLogger(), logging.getLogger("lipsync")
    levels = root.level, ours.level
    yield buffer
    for handler in [h for h in root.handlers if isinstance(h, logs.ProgressAwareHandler)]:
        root.removeHandler(handler)
    root.setLevel(levels[0]), ours.setLevel(levels[1])


def test_json_lines_carry_time_level_logger_message_and_exception(stderr):
    logs.setup("INFO", "json", stream=stderr)
    logging.getLogger("lipsync.model.autotune").info("chose %s", "openvino/fp32")
    logging.getLogger("onnxscript").info("a third-party INFO line")  # below WARNING: not written
    logging.getLogger("onnxscript").warning("a third-party warning")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("lipsync.api.server").exception("request failed")
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [(x["level"], x["logger"], x["message"]) for x in lines] == [
        ("INFO", "lipsync.model.autotune", "chose openvino/fp32"), ("WARNING", "onnxscript", "a third-party warning"),
        ("ERROR", "lipsync.api.server", "request failed")]
    assert "RuntimeError: boom" in lines[2]["exception"] and "exception" not in lines[0]
    assert all(len(x["time"]) == 24 and x["time"].endswith("Z") for x in lines)  # 2026-12-02T07:19:24.499Z


def test_a_line_logged_while_a_bar_runs_is_written_above_it(stderr):
    logs.setup("INFO", "text", "%(levelname)s %(name)s: %(message)s", stderr)
    bar = tqdm(total=10, desc="tuning", file=stderr, disable=False)
    bar.update(3)
    logging.getLogger("lipsync.x").info("built openvino/fp32")
    bar.update(3)
    bar.close()
    pieces = [piece.split("\r")[-1] for piece in stderr.getvalue().split("\n")]  # what a terminal shows per line
    assert "INFO lipsync.x: built openvino/fp32" in pieces


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="must be one of text, json"):
        logs.setup("INFO", "yaml")


def test_serve_writes_json_lines_on_request(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lipsync", "--log-format", "json", "serve", "--check",
                           "models=none", "logging.level=DEBUG"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    assert any(x["level"] == "DEBUG" and x["message"].startswith("config:") for x in lines)
