"""The Despina dashboard's panels, one place: ``dashboard_build.py`` writes them into Grafana's
JSON (deploy/grafana/despina-dashboard.json) and ``dashboard_render.py`` draws the same queries
from a real scrape series (docs/img/dashboard.png). Every query names Triton's metrics
(what a Triton dashboard already shows) or Despina's ``despina_stage_duration_us``.

Each panel: (title, unit, [(legend, PromQL)]). ``$__rate_interval`` is Grafana's; the
renderer reads it as the window between two scrapes.
"""

from __future__ import annotations

RATE = "$__rate_interval"


def _per_request(metric: str) -> str:
    """Average µs per successful request of a cumulative duration counter."""
    return (
        f"sum by (model) (rate({metric}[{RATE}])) / "
        f"sum by (model) (rate(nv_inference_request_success[{RATE}]))"
    )


PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Successful requests per second",
        "reqps",
        [("{{model}}", f"sum by (model) (rate(nv_inference_request_success[{RATE}]))")],
    ),
    (
        "Failed requests per second, by reason",
        "reqps",
        [
            (
                "{{model}} {{reason}}",
                f"sum by (model, reason) (rate(nv_inference_request_failure[{RATE}]))",
            )
        ],
    ),
    (
        "Average batch size (inferences per execution)",
        "none",
        [
            (
                "{{model}}",
                f"sum by (model) (rate(nv_inference_count[{RATE}])) / "
                f"sum by (model) (rate(nv_inference_exec_count[{RATE}]))",
            )
        ],
    ),
    (
        "Average request latency (Triton's cumulative durations)",
        "µs",
        [
            ("{{model}} request", _per_request("nv_inference_request_duration_us")),
            ("{{model}} queue", _per_request("nv_inference_queue_duration_us")),
            ("{{model}} compute input", _per_request("nv_inference_compute_input_duration_us")),
            ("{{model}} compute infer", _per_request("nv_inference_compute_infer_duration_us")),
            (
                "{{model}} compute output",
                _per_request("nv_inference_compute_output_duration_us"),
            ),
        ],
    ),
    (
        "p99 per stage, every frontend and backend host (despina_stage_duration_us)",
        "µs",
        [
            (
                "{{stage}}",
                "histogram_quantile(0.99, sum by (le, stage) "
                f"(rate(despina_stage_duration_us_bucket[{RATE}])))",
            )
        ],
    ),
    (
        "p50 per stage (despina_stage_duration_us)",
        "µs",
        [
            (
                "{{stage}}",
                "histogram_quantile(0.5, sum by (le, stage) "
                f"(rate(despina_stage_duration_us_bucket[{RATE}])))",
            )
        ],
    ),
    (
        "Pending requests",
        "none",
        [("{{model}}", "sum by (model) (nv_inference_pending_request_count)")],
    ),
    (
        "CPU utilization and memory",
        "percentunit",
        [
            ("cpu", "nv_cpu_utilization"),
            ("memory used", "nv_cpu_memory_used_bytes / nv_cpu_memory_total_bytes"),
        ],
    ),
]
