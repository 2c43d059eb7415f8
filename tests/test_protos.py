"""The committed gRPC stubs (clients/python/lipsync_client/_proto) are current with protos/, and the server's
`lipsync._proto` is the very same modules."""
from __future__ import annotations

import filecmp

from lipsync import protos


def test_stubs_are_current(tmp_path):
    assert not protos.is_stale(), "gRPC stubs are stale: run `make protos` and commit them"
    fresh = protos.generate(tmp_path / "fresh")
    names = sorted(p.name for p in [*fresh.glob("*.py"), *fresh.glob("*.pyi")])
    assert names == sorted(p.name for p in [*protos.OUT_DIR.glob("*.py"), *protos.OUT_DIR.glob("*.pyi")])
    match, mismatch, errors = filecmp.cmpfiles(fresh, protos.OUT_DIR, names, shallow=False)
    assert mismatch == [] and errors == []


def test_staleness_is_detected(tmp_path):
    out = protos.generate(tmp_path / "stubs")
    (out / "__init__.py").write_text('PROTO_DIGEST = "0"\n')
    assert protos.is_stale(out)


def test_server_and_client_share_one_copy_of_the_stubs():
    import lipsync._proto.lipsync_pb2 as server_pb
    import lipsync_client._proto.lipsync_pb2 as client_pb

    from lipsync._proto import monolithic_pb2_grpc

    assert server_pb is client_pb and server_pb.Frame is client_pb.Frame
    assert monolithic_pb2_grpc.__name__ == "lipsync_client._proto.monolithic_pb2_grpc"
