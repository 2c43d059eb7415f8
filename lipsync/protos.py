"""Generate from `protos/` the gRPC Python stubs of the client package (`lipsync_client/_proto/`) and the gRPC API
reference (`docs/api.md`, from the proto's comments); both are committed.

`python -m lipsync.protos` (`make protos`) writes them; `--check` exits 1 when either is stale.
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
OUT_DIR = ROOT / "clients" / "python" / "lipsync_client" / "_proto"  # the client package owns the stubs
PROTO_FILES = ["lipsync/v1/lipsync.proto", "monolithic.proto"]
API_DOC = ROOT / "docs" / "api.md"


def proto_digest() -> str:
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update((PROTO_DIR / name).read_bytes())
    return digest.hexdigest()


def _protoc(*outputs: str) -> None:
    """Run protoc (grpcio-tools, with its well-known types) over PROTO_FILES with the given output options."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    if protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", *outputs,
                    *[str(PROTO_DIR / p) for p in PROTO_FILES]]) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR}")


def generate(out_dir: Path = OUT_DIR) -> Path:
    """Run protoc and flatten the stubs into one package with relative imports."""
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        for file in [*Path(tmp).rglob("*.py"), *Path(tmp).rglob("*.pyi")]:
            text = file.read_text()
            text = re.sub(r"^from lipsync\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
            (out_dir / file.name).write_text(text)
    (out_dir / "__init__.py").write_text(f'"""Generated from protos/ by lipsync.protos; do not edit."""\n'
                                         f'PROTO_DIGEST = "{proto_digest()}"\n')
    return out_dir


def _descriptors():
    """protoc's own parse of the protos, with their comments (source info)."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        _protoc("--include_source_info", f"--descriptor_set_out={out}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file


_SCALARS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool", 9: "string", 12: "bytes",
            13: "uint32", 17: "sint32", 18: "sint64"}


def api_reference() -> str:
    """docs/api.md: every service, RPC, message, field and enum value of protos/, with its comment."""
    lines = ["# gRPC API", "",
             "Generated from `protos/` by `python -m lipsync.protos` (`make protos`): the proto files' comments are",
             "the source. Both services listen on the same port. The Python stubs are `lipsync_client.LipSyncStub`",
             "and `lipsync_client._proto.monolithic_pb2_grpc`. A refused call is a gRPC status code with a one-line",
             "message ([Troubleshooting](troubleshooting.md)).", ""]
    for file in _descriptors():
        notes = {tuple(loc.path): " ".join((loc.leading_comments + " " + loc.trailing_comments).split())
                 for loc in file.source_code_info.location}

        def note(*path: int) -> str:
            return notes.get(path, "").replace("|", "\\|")

        def type_of(field, nested: dict) -> str:
            if field.type_name:
                name = field.type_name.rsplit(".", 1)[-1]
                if name in nested:  # a map's entry message
                    key, value = nested[name].field
                    return f"map<{type_of(key, {})}, {type_of(value, {})}>"
            else:
                name = _SCALARS.get(field.type, str(field.type))
            return f"repeated {name}" if field.label == 3 else name

        lines += [f"## {file.package or 'monolithic'} (`protos/{file.name}`)", ""]
        header = note(12) or note(2)
        if header:
            lines += [header, ""]
        for s_index, service in enumerate(file.service):
            lines += [f"### service {service.name}", "", "| RPC | request → response | |", "|---|---|---|"]
            for m_index, method in enumerate(service.method):
                request = ("stream " if method.client_streaming else "") + method.input_type.rsplit(".", 1)[-1]
                reply = ("stream " if method.server_streaming else "") + method.output_type.rsplit(".", 1)[-1]
                lines.append(f"| `{method.name}` | `{request}` → `{reply}` | {note(6, s_index, 2, m_index)} |")
            lines.append("")

        def enum_doc(enum, path: tuple[int, ...], prefix: str = "") -> None:
            lines.extend([f"### enum {prefix}{enum.name}", ""] + ([note(*path), ""] if note(*path) else [])
                         + ["| value | number | |", "|---|---|---|"])
            for v_index, value in enumerate(enum.value):
                lines.append(f"| `{value.name}` | {value.number} | {note(*path, 2, v_index)} |")
            lines.append("")

        def message_doc(message, path: tuple[int, ...], prefix: str = "") -> None:
            nested = {m.name: m for m in message.nested_type if m.options.map_entry}
            lines.extend([f"### message {prefix}{message.name}", ""] + ([note(*path), ""] if note(*path) else []))
            if message.field:
                lines.extend(["| field | type | number | |", "|---|---|---|---|"])
                for f_index, field in enumerate(message.field):
                    oneof = f" (one of `{message.oneof_decl[field.oneof_index].name}`)" \
                        if field.HasField("oneof_index") and not field.proto3_optional else ""
                    lines.append(f"| `{field.name}` | `{type_of(field, nested)}` | {field.number} | "
                                 f"{note(*path, 2, f_index)}{oneof} |")
            lines.append("")
            for k, inner in enumerate(message.nested_type):
                if not inner.options.map_entry:
                    message_doc(inner, (*path, 3, k), f"{prefix}{message.name}.")
            for k, enum in enumerate(message.enum_type):
                enum_doc(enum, (*path, 4, k), f"{prefix}{message.name}.")
        for e_index, enum in enumerate(file.enum_type):
            enum_doc(enum, (5, e_index))
        for m_index, message in enumerate(file.message_type):
            message_doc(message, (4, m_index))
    return "\n".join(lines).rstrip() + "\n"


def is_stale(out_dir: Path = OUT_DIR) -> bool:
    init = out_dir / "__init__.py"
    return not init.is_file() or proto_digest() not in init.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs or docs/api.md are stale")
    args = parser.parse_args()
    if args.check:
        stale = is_stale() or not API_DOC.is_file() or API_DOC.read_text() != api_reference()
        print("stubs or docs/api.md are stale: run `make protos` and commit clients/python/lipsync_client/_proto and "
              "docs/api.md" if stale else "stubs and docs/api.md are current")
        return int(stale)
    print(f"generated {generate()}")
    API_DOC.write_text(api_reference())
    print(f"wrote {API_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
