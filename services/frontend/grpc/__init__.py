"""The gRPC frontend: Triton's ``inference.GRPCInferenceService`` on grpc.aio.

``servicer`` holds the thin handlers, ``converters`` the protobuf <-> record functions,
``errors`` the one table from error codes to gRPC status codes, and ``server`` the
grpc.aio server built from tritonserver's ``--grpc-*`` flags.
"""
