"""Generate the gRPC Python stubs from `protos/` into `lipsync/_proto/` (run by `make setup`).

`python -m lipsync.protos` writes them; `python -m lipsync.protos --check` exits 1 when they are stale.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
PROTO_FILES = ["lipsync/v1/lipsync.proto", "monolithic.proto"]


def proto_digest() -> str:
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update((PROTO_DIR / name).read_bytes())
    return digest.hexdigest()


def generate(out_dir: Path = OUT_DIR) -> Path:
    """Run protoc (grpcio-tools) and flatten the stubs into one package with relative imports."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                *[str(PROTO_DIR / p) for p in PROTO_FILES]]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        for file in Path(tmp).rglob("*.py"):
            text = file.read_text()
            text = re.sub(r"^from lipsync\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
            (out_dir / file.name).write_text(text)
    (out_dir / "__init__.py").write_text(f'"""Generated from protos/ by lipsync.protos; do not edit."""\n'
                                         f'PROTO_DIGEST = "{proto_digest()}"\n')
    return out_dir


def is_stale(out_dir: Path = OUT_DIR) -> bool:
    init = out_dir / "__init__.py"
    return not init.is_file() or proto_digest() not in init.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs are stale")
    args = parser.parse_args()
    if args.check:
        stale = is_stale()
        print("stubs are stale: run `make setup`" if stale else "stubs are current")
        return int(stale)
    print(f"generated {generate()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
