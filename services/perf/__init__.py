"""``despina perf``: KServe v2 load for one model, closed loop or at a fixed rate.

    despina perf --url http://127.0.0.1:8000 --model add_sub -c 8 -d 10 \
        --protocol http-json|http-binary|http-shm|grpc|grpc-stream [--warmup 2] [--sweep 1,8,32] \
        [--rate 1000,2000] [--json-out FILE] [--csv-out FILE] [--plot FILE.png]

It learns the model's inputs from ``GET /v2/models/{model}`` and ``/config`` (gRPC:
ModelMetadata/ModelConfig), builds one request with random data (JSON, Triton's binary
tensor extension, client system shared memory regions, or a ModelInferRequest),
serializes it once, and keeps ``-c`` keep-alive connections each with one request in
flight (or sends ``--rate`` requests/s over them) for a warm-up and then a measurement
window. Each run prints one line: infer/s, latency percentiles, errors and the client's
own CPU time, so a run that starved the server of CPU is visible.

The client must cost far less CPU than the server it measures on a 2-core machine, so the
HTTP hot path is a bare ``asyncio.Protocol`` per connection (no coroutine, future or await
per request): the request bytes are prebuilt, a response is parsed only as far as its
status code and Content-Length, and latencies go into a preallocated ``array('q')``.
``--processes`` splits the connections over forked workers; ``--engine wrk`` drives the
``wrk`` binary instead, when it is installed. gRPC is driven by ``h2load`` or, as a
fallback and for ``--rate``, by grpc.aio (``grpc_engine.py``).

Modules: ``target`` (the request, built once), ``http_engine`` and ``grpc_engine`` (the
load), ``report`` (records, CSV, plot), ``cli`` (flags and the run).

HTTP needs only the standard library and numpy (uvloop and orjson are used when present),
so it runs against Triton or Despina from any environment; gRPC also needs grpcio and
tritonclient[grpc] (both in the base install); ``--plot`` needs matplotlib (the
``loadtest`` extra).
"""
