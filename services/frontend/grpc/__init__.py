"""The gRPC frontend: Triton's ``inference.GRPCInferenceService``.

``servicer`` holds the thin handlers, ``converters`` the protobuf <-> record functions,
``errors`` the gRPC status codes and the one table from error codes to them, ``h2server``
the lean HTTP/2 transport that serves plaintext gRPC on the frontend's loop, and
``server`` the server built from tritonserver's ``--grpc-*`` flags (h2server, or
grpc.aio for TLS, response compression and custom keepalive settings).
"""
