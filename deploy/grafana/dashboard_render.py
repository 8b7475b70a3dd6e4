"""Draw the dashboard's panels (dashboard_panels.py, the same PromQL as despina-dashboard.json) from
a real scrape series into a PNG, where no Grafana runs: docs/img/dashboard.png is made
by this script, not by Grafana.

    python deploy/grafana/dashboard_render.py [--seconds 30] [--out docs/img/dashboard.png]

It starts ``despina serve`` on the shipped model repository (free ports), sends a mixed
load with tritonclient (the ONNX ``simple`` and the Python ``add_sub`` over HTTP and
gRPC, a few bad requests for the failure panel), scrapes ``/metrics`` once a second,
and evaluates each query at every scrape with a small evaluator of the PromQL the
panels use (``rate``, ``sum by``, ``/`` between vectors with the same labels,
``histogram_quantile``), then stops the server.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from dashboard_panels import PANELS  # noqa: E402

Labels = frozenset  # of (name, value)
Vector = dict  # Labels -> float
Scrape = tuple  # (time, {sample name: {Labels: value}})


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_scrape(text: str) -> dict[str, dict[Labels, float]]:
    """Prometheus' text format as a server stores it: each series by its name as written
    (``prometheus_client``'s parser would rename counters to ``*_total``)."""
    samples: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if line.startswith("#") or not found:
            continue
        name, labels, value = found.groups()
        key = frozenset(_LABEL.findall(labels or ""))
        samples.setdefault(name, {})[key] = float(value)
    return samples


class Query:
    """Evaluates one panel expression at scrape ``i`` (rates over scrapes i-1..i)."""

    def __init__(self, expr: str) -> None:
        self.tokens = re.findall(r"\$__rate_interval|[A-Za-z_][A-Za-z0-9_]*|[0-9.]+|\S", expr)
        self.pos = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, want: str | None = None) -> str:
        tok = self.tokens[self.pos]
        if want is not None and tok != want:
            raise ValueError(f"expected {want!r}, got {tok!r} in {' '.join(self.tokens)}")
        self.pos += 1
        return tok

    def parse(self):  # type: ignore[no-untyped-def]
        node = self._term()
        while self._peek() == "/":
            self._take("/")
            node = ("div", node, self._term())
        return node

    def _term(self):  # type: ignore[no-untyped-def]
        tok = self._take()
        if tok == "sum":
            self._take("by")
            self._take("(")
            by = []
            while self._peek() != ")":
                name = self._take()
                if name != ",":
                    by.append(name)
            self._take(")")
            self._take("(")
            inner = self.parse()
            self._take(")")
            return ("sum", tuple(by), inner)
        if tok == "histogram_quantile":
            self._take("(")
            q = float(self._take())
            self._take(",")
            inner = self.parse()
            self._take(")")
            return ("quantile", q, inner)
        if tok == "rate":
            self._take("(")
            metric = self._take()
            self._take("[")
            self._take()
            self._take("]")
            self._take(")")
            return ("rate", metric)
        return ("value", tok)


def evaluate(node, scrapes: list[Scrape], i: int) -> Vector:  # type: ignore[no-untyped-def]
    kind = node[0]
    if kind == "value":
        return dict(scrapes[i][1].get(node[1], {}))
    if kind == "rate":
        (t0, before), (t1, now) = scrapes[i - 1], scrapes[i]
        old = before.get(node[1], {})
        return {
            labels: max(0.0, value - old.get(labels, 0.0)) / (t1 - t0)
            for labels, value in now.get(node[1], {}).items()
        }
    if kind == "sum":
        out: Vector = {}
        for labels, value in evaluate(node[2], scrapes, i).items():
            key = frozenset((k, v) for k, v in labels if k in node[1])
            out[key] = out.get(key, 0.0) + value
        return out
    if kind == "div":  # one-to-one on identical labels, as PromQL matches vectors
        left, right = evaluate(node[1], scrapes, i), evaluate(node[2], scrapes, i)
        return {labels: v / right[labels] for labels, v in left.items() if right.get(labels)}
    if kind == "quantile":
        return _quantile(node[1], evaluate(node[2], scrapes, i))
    raise ValueError(kind)


def _quantile(q: float, buckets: Vector) -> Vector:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for labels, value in buckets.items():
        le = dict(labels)["le"]
        rest = frozenset((k, v) for k, v in labels if k != "le")
        groups.setdefault(rest, []).append((float(le), value))
    out: Vector = {}
    for labels, pairs in groups.items():
        pairs.sort()
        total = pairs[-1][1]
        if total <= 0:
            continue
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in pairs:
            if count >= rank:
                if bound == float("inf"):
                    out[labels] = lower_bound
                else:
                    share = (rank - lower_count) / max(count - lower_count, 1e-12)
                    out[labels] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    return out


def legend(template: str, labels: Labels) -> str:
    names = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: names.get(m.group(1), ""), template).strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(http_url: str, grpc_url: str, stop: threading.Event) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(http_url)
    grpc = grpcclient.InferenceServerClient(grpc_url)
    ints = np.arange(16, dtype=np.int32).reshape(1, 16)
    floats = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16)
    n = 0
    while not stop.is_set():
        n += 1
        for lib, client in ((httpclient, http), (grpcclient, grpc)):
            inputs = [lib.InferInput(f"INPUT{k}", [1, 16], "INT32") for k in (0, 1)]
            for tensor in inputs:
                tensor.set_data_from_numpy(ints)
            client.infer("simple", inputs)
            if n % 3 == 0:
                inputs = [lib.InferInput(f"INPUT{k}", [1, 16], "FP32") for k in (0, 1)]
                for tensor in inputs:
                    tensor.set_data_from_numpy(floats)
                client.infer("add_sub", inputs)
        if n % 50 == 0:  # a request the model refuses: the failure panel's line
            bad = [httpclient.InferInput("INPUT0", [1, 16], "INT32")]
            bad[0].set_data_from_numpy(ints)
            try:
                http.infer("simple", bad)
            except Exception:
                pass


def collect(seconds: float) -> list[Scrape]:
    ports = [_free_port() for _ in range(3)]
    log = open("/tmp/despina-dashboard-render.log", "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "despina.services.cli",
            "serve",
            f"--model-repository={ROOT / 'model_repository'}",
            f"--http-port={ports[0]}",
            f"--grpc-port={ports[1]}",
            f"--metrics-port={ports[2]}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=1)
                break
            except Exception:
                time.sleep(0.5)
        stop = threading.Event()
        loader = threading.Thread(
            target=_load, args=(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", stop)
        )
        loader.start()
        scrapes: list[Scrape] = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            text = urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/metrics", timeout=5)
            scrapes.append((time.monotonic() - start, parse_scrape(text.read().decode())))
            time.sleep(1.0)
        stop.set()
        loader.join()
        return scrapes
    finally:
        server.terminate()
        server.wait(30)


def render(scrapes: list[Scrape], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(PANELS) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(16, 3.6 * rows))
    for ax, (title, unit, queries) in zip(axes.flat, PANELS):
        for template, expr in queries:
            tree = Query(expr).parse()
            series: dict[str, tuple[list[float], list[float]]] = {}
            for i in range(1, len(scrapes)):
                for labels, value in evaluate(tree, scrapes, i).items():
                    xs, ys = series.setdefault(legend(template, labels), ([], []))
                    xs.append(scrapes[i][0])
                    ys.append(value)
            moving = {k: v for k, v in series.items() if any(v[1])}
            # A flat zero (a model nobody called) says nothing once another line moves.
            for name, (xs, ys) in sorted((moving or series).items()):
                ax.plot(xs, ys, label=name, linewidth=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "Despina dashboard, rendered by deploy/grafana/dashboard_render.py from a real "
        "scrape series (the dashboard's own queries; not a Grafana screenshot)",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    render(collect(args.seconds), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
