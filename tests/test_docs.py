"""The docs cannot drift: every fenced block of README.md and docs/ marked runnable runs as written, on this CPU.

A block is marked by the line before its fence: `<!-- run -->` runs it from the repository root (bash for
`bash`/`sh` blocks, this interpreter for `python`); `<!-- run: server -->` runs it while a `lipsync serve` of the demo
model listens, with that server's address put for the block's `127.0.0.1:50051` (the only substitution). The site
builds with `mkdocs build --strict` (make test runs it too) and the gRPC reference is current with protos/."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- run(?:: (?P<needs>server))? -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```$", re.M | re.S)
DEMO_TARGET = "127.0.0.1:50051"


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    needs_server: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def runnable_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text[:m.start()].count("\n") + 2, m["lang"], m["code"], m["needs"] == "server")
            for m in MARK.finditer(text)]


def run_block(block: Block, target: str | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run a block as a reader would paste it; the venv's bin first on PATH, as `.venv/bin/…` resolves it."""
    code = block.code.replace(DEMO_TARGET, target) if target else block.code
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if block.lang in ("bash", "sh"):
        command = ["bash", "-euo", "pipefail", "-c", code]
    elif block.lang == "python":
        command = [sys.executable, "-c", code]
    else:
        raise AssertionError(f"{block.name}: a runnable block must be bash, sh or python, not {block.lang}")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


BLOCKS = [b for page in PAGES for b in runnable_blocks(page)]


def test_pages_mark_blocks_to_run():
    names = {b.name.split(":")[0] for b in BLOCKS}
    assert {"README.md", "docs/python-api.md", "docs/install.md", "docs/live.md"} <= names
    assert sum(b.needs_server for b in BLOCKS) >= 3


def test_a_failing_block_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- run -->\n```bash\ntrue\nfalse\necho unreachable\n```\n")
    [block] = runnable_blocks(page)
    done = run_block(block)
    assert block.line == 4 and done.returncode != 0 and "unreachable" not in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.needs_server], ids=lambda b: b.name)
def test_block_runs(block):
    done = run_block(block)
    assert done.returncode == 0, f"{block.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    # the reader's server: the default engine (auto; README.md's render above has measured and cached its choice
    # for the demo, so this load reads it), not the pinned onnxruntime of the other tests' servers
    srv = ServerProcess(["engine=auto", "models=demo"], tmp_path_factory.mktemp("docs-server"), cwd=ROOT)
    yield srv
    srv.stop()


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.needs_server], ids=lambda b: b.name)
def test_block_runs_against_a_server(block, demo_server):
    done = run_block(block, demo_server.target)
    assert done.returncode == 0, f"{block.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    check_outcome(block, done.stdout)


def check_outcome(block: Block, stdout: str) -> None:
    """What a reader of a live-session block expects to see, not only a clean exit: the avatar spoke."""
    if "--converse" in block.code:  # the client's JSON summary of a scripted conversation
        summary = json.loads(stdout[stdout.index("{"):])
        assert summary["speech"] > 0 and summary["utterances"], summary
        played = {name: u.get("frames_played", 0) for name, u in summary["utterances"].items()}
        assert played and all(n > 0 for n in played.values()), f"{block.name}: utterances that never played {played}"
    elif "converse(" in block.code and "summary()" in block.code:  # the Python examples print their utterances
        assert re.search(r"'frames_played': [1-9]", stdout), f"{block.name}: no utterance played:\n{stdout[-2000:]}"
    elif "speech_audio_s" in stdout:  # the Pipecat and LiveKit examples: the utterance's audio came back, in full
        said = {k: float(v) for k, v in re.findall(r"['\"](speech_audio_s|sent_audio_s)['\"]: ([\d.]+)", stdout)}
        assert said["speech_audio_s"] >= 0.95 * said["sent_audio_s"] > 0, f"{block.name}: {said}"


def test_site_builds_strictly(tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "api" / "index.html").is_file()


def test_api_reference_is_current():
    from lipsync import protos

    assert (ROOT / "docs" / "api.md").read_text() == protos.api_reference(), "run `make protos`"


def test_the_docs_stand_alone():
    """README and docs/ explain what they rely on themselves: no page sends its reader to the project's internal
    contract (SPEC), which users do not have."""
    cited = {p.name: re.findall(r"\bSPEC\b[^|\n]{0,20}", p.read_text()) for p in PAGES}
    assert not {k: v for k, v in cited.items() if v}, cited


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")} - set(), sorted(
        {p.name for p in (ROOT / "docs").glob("*.md")} - linked)  # every reference page is reachable from it
