"""Generated protobuf, gRPC and typed-stub code (`make protos`); only this file is committed.

    from services.pb.cpumesh.v1 import shard_pb2, shard_pb2_grpc

Importing this package fails with ImportError when the generated code is missing, or when the
protos in the source tree changed since it was generated (a cheap hash of protos/, the one thing
this package does at import).
"""

from pathlib import Path

from services.protogen import check_generated

check_generated(Path(__file__).parent, Path(__file__).resolve().parents[2] / "protos")
