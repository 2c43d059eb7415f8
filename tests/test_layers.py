"""The package's layers: the import-linter contract holds, no module-level import cycle exists (deferred imports
included, TYPE_CHECKING ones aside), the top level stays small, and the old flat import paths still work."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from conftest import ROOT

grimp = pytest.importorskip("grimp", reason="grimp is not installed (import-linter, the dev extra)")

LAYERS = ["lipsync.integrations", "lipsync.apps", "lipsync.api", "lipsync.runtime", "lipsync.model", "lipsync.codec"]
FOUNDATION = {"lipsync.config", "lipsync.errors", "lipsync.timebase", "lipsync.logs", "lipsync.threads",
              "lipsync._proto", "lipsync.protos"}


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter in the source tree (its imports are its own, not this process's)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def graph() -> grimp.ImportGraph:
    return grimp.build_graph("lipsync", exclude_type_checking_imports=True)


def test_the_import_contracts_hold():
    lint = ROOT / ".venv" / "bin" / "lint-imports"
    command = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run([*command, "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_each_layer_imports_only_from_the_layers_below_it():
    """The same rule, checked here without import-linter's own reading of the contract: every import edge
    between lipsync modules goes down (or stays within one layer)."""
    g = graph()

    def layer(module: str) -> int:
        for rank, package in enumerate(LAYERS):
            if module == package or module.startswith(package + "."):
                return rank
        assert any(module == f or module.startswith(f + ".") for f in FOUNDATION) or module == "lipsync" \
            or module == "lipsync.__main__", f"{module} is in no layer"
        return len(LAYERS)

    upward = [(m, i) for m in g.modules for i in g.find_modules_directly_imported_by(m)
              if m != "lipsync.__main__" and i != "lipsync" and layer(i) < layer(m)]
    assert not upward, upward


def test_no_module_level_import_cycle():
    g = graph()
    edges = {m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every module it reaches is checked

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in edges.get(module, ()):
            if state.get(imported) == "open":
                cycle = path[path.index(imported):] + [module, imported] if imported in path else [module, imported]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if imported not in state:
                visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_top_level_holds_only_the_layers_and_the_foundation():
    top = sorted(p.stem for p in (ROOT / "lipsync").iterdir()
                 if (p.suffix == ".py" or (p / "__init__.py").exists()))
    assert top == ["__init__", "__main__", "_proto", "api", "apps", "codec", "config", "errors", "integrations",
                   "logs", "model", "protos", "runtime", "threads", "timebase"]


def test_the_flat_import_paths_still_work_and_say_where_things_went():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from lipsync import audio, models\n"
            "import lipsync.pipeline, lipsync.render, lipsync.client, lipsync.export.onnx_export\n"
            "from lipsync.model.audio_features import frame_features\n"
            "from lipsync.codec.audio import load_wav\n"
            "from lipsync.model.networks import load_generator\n"
            "assert audio.frame_features is frame_features and audio.load_wav is load_wav\n"
            "assert audio.SAMPLE_RATE == 16000 and models.load_generator is load_generator\n"
            "assert lipsync.pipeline.load_pipeline.__module__ == 'lipsync.model.pipeline'\n"
            "assert lipsync.render.synthesize.__module__ == 'lipsync.runtime.render'\n")
    done = fresh_python(code)
    assert "DeprecationWarning: lipsync.pipeline moved to lipsync.model.pipeline" in done.stderr
    assert "lipsync.audio moved to lipsync.codec.audio + lipsync.model.audio_features" in done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import lipsync.model.pipeline  # noqa: F401  (the new paths warn about nothing)


def test_the_command_line_lists_its_commands_without_importing_torch_or_grpc():
    """`lipsync --help` (and `serve --help`) build only what they show: no command pays for another's imports."""
    code = ("import sys\nfrom lipsync.apps.cli import main\n"
            "for argv in (['--help'], ['serve', '--help'], ['render', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'grpc', 'torchvision', 'hydra') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    done = fresh_python(code)
    assert "HEAVY []" in done.stdout and "serve" in done.stdout and "--check" in done.stdout
