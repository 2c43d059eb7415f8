"""The README's ten-line live session runs as written, on this test's server, model and speech file."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_live_session_runs(target, model, speech):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[0]
    assert "ls.converse(" in example and len(example.strip().splitlines()) <= 12
    code = (example.replace('"127.0.0.1:50051"', repr(target)).replace('"demo"', repr(model))
            .replace('"assets/speech.wav"', repr(os.environ["LIPSYNC_TEST_SPEECH"])))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'utterances'" in run.stdout and "'late_frames'" in run.stdout
