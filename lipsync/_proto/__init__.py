"""The gRPC stubs, as the server imports them: the very modules of `lipsync_client._proto` (generated from protos/ by
`python -m lipsync.protos`), under this name too. Aliases, not copies: protobuf registers each .proto once per
process, and a second copy of a generated module would fail to load beside the client's."""
import sys

from lipsync_client._proto import PROTO_DIGEST, lipsync_pb2, lipsync_pb2_grpc, monolithic_pb2, monolithic_pb2_grpc

for _module in (lipsync_pb2, lipsync_pb2_grpc, monolithic_pb2, monolithic_pb2_grpc):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

__all__ = ["PROTO_DIGEST", "lipsync_pb2", "lipsync_pb2_grpc", "monolithic_pb2", "monolithic_pb2_grpc"]
