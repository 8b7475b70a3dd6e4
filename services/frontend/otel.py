"""OpenTelemetry export of traces (``--trace-config mode=opentelemetry``), as Triton
shapes it: per traced request a top-level span ``InferRequest`` (events: the
protocol's HTTP_RECV_* / HTTP_SEND_* or GRPC_WAITREAD_* / GRPC_SEND_*, where stamped),
under it a span named after the model (attributes ``triton.model_name``,
``triton.model_version``, ``triton.trace_id``, ``triton.trace_parent_id``,
``triton.request_id``; events REQUEST_START, QUEUE_START, REQUEST_END), and under that a
span ``compute`` (events COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START,
COMPUTE_END). Timestamps are the trace's own (wall-clock ns, as OpenTelemetry wants
them).

Spans leave through the SDK's batch span processor and the OTLP/HTTP exporter (a thread
of the SDK's, off the loop) to ``url`` (default ``http://localhost:4318/v1/traces``).
Settings, from ``--trace-config opentelemetry,<setting>=<value>``: ``url``, ``resource``
(``key=value``, repeatable; default ``service.name=triton-inference-server``),
``bsp_max_queue_size``, ``bsp_schedule_delay`` (ms), ``bsp_max_export_batch_size``.

The packages (``opentelemetry-sdk``, ``opentelemetry-exporter-otlp-proto-http``; the
``otel`` extra) are optional: ``missing`` says which is absent, and the server refuses
to start in this mode without them (services/observability_flags.py).
"""

from __future__ import annotations

import importlib

DEFAULT_URL = "http://localhost:4318/v1/traces"
SETTINGS = (
    "url",
    "resource",
    "bsp_max_queue_size",
    "bsp_schedule_delay",
    "bsp_max_export_batch_size",
)
_PACKAGES = {
    "opentelemetry.sdk.trace": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter": "opentelemetry-exporter-otlp-proto-http",
}
_MODEL_EVENTS = ("REQUEST_START", "QUEUE_START", "REQUEST_END")
_PROTOCOL_EVENTS = ("HTTP_", "GRPC_")  # the receipt and the send: on the InferRequest span


def missing() -> list[str]:
    """The packages this mode needs that cannot be imported here (empty: none)."""
    absent = []
    for module, package in _PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(package)
    return absent


class OtelExport:
    """Turns finished trace records (services/frontend/trace.py) into spans and hands
    them to the SDK's batch processor. ``export`` runs on the loop and does no I/O."""

    def __init__(self, settings: dict[str, list[str]]) -> None:
        """``settings``: the opentelemetry settings by name, values as given. Raises
        ImportError without the packages, ValueError for a malformed number."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import set_span_in_context

        attributes = {"service.name": "triton-inference-server"}
        for pair in settings.get("resource", []):
            key, _, value = pair.partition("=")
            attributes[key] = value
        self._provider = TracerProvider(resource=Resource.create(attributes))

        def number(name: str) -> int | None:
            value = settings.get(name)
            return int(value[-1]) if value else None

        self._provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=settings.get("url", [DEFAULT_URL])[-1]),
                max_queue_size=number("bsp_max_queue_size"),
                schedule_delay_millis=number("bsp_schedule_delay"),
                max_export_batch_size=number("bsp_max_export_batch_size"),
            )
        )
        self._tracer = self._provider.get_tracer("despina")
        self._in_context = set_span_in_context

    def export(self, record: dict) -> None:
        """One trace record's spans, ended and queued for export."""
        stamps = [(s["name"], s["ns"]) for s in record["timestamps"]]
        first, last = stamps[0][1], stamps[-1][1]
        tracer = self._tracer
        root = tracer.start_span("InferRequest", start_time=first)
        attributes: dict[str, str | int] = {
            "triton.model_name": record["model_name"],
            "triton.model_version": record.get("model_version", -1),
            "triton.trace_id": record["id"],
            "triton.trace_parent_id": 0,
        }
        if record.get("request_id"):
            attributes["triton.request_id"] = record["request_id"]
        spans = [ns for name, ns in stamps if name in _MODEL_EVENTS] or [first, last]
        model = tracer.start_span(
            record["model_name"],
            context=self._in_context(root),
            attributes=attributes,
            start_time=spans[0],
        )
        compute = [(name, ns) for name, ns in stamps if name.startswith("COMPUTE_")]
        for name, ns in stamps:
            if name in _MODEL_EVENTS:
                model.add_event(name, timestamp=ns)
            elif name.startswith(_PROTOCOL_EVENTS):
                root.add_event(name, timestamp=ns)
        if compute:
            span = tracer.start_span(
                "compute", context=self._in_context(model), start_time=compute[0][1]
            )
            for name, ns in compute:
                span.add_event(name, timestamp=ns)
            span.end(end_time=compute[-1][1])
        model.end(end_time=spans[-1])
        root.end(end_time=last)

    def close(self) -> None:
        """Send what is batched, waiting a second at most (a collector that does not
        answer must not hold the frontend's exit)."""
        self._provider.force_flush(timeout_millis=1000)
