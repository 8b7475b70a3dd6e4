"""``despina perf`` (the installed command) drives every protocol it offers against a real
server: a short run per protocol, no errors, and results a person can read (infer/s and
percentiles); loadtest/ab.py and loadtest/experiments/stalls.py run on top of it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
DESPINA = str(Path(sys.executable).parent / "despina")  # the console script pip installed


@pytest.mark.parametrize(
    ("protocol", "model"),
    [
        ("http-json", "add_sub"),
        ("http-binary", "simple"),
        ("http-shm", "simple"),
        ("grpc", "add_sub"),
        ("grpc-stream", "simple"),
    ],
)
def test_perf_drives_each_protocol(server, tmp_path, protocol, model):
    url = server.grpc_url if protocol.startswith("grpc") else f"http://{server.url}"
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [
            DESPINA,
            "perf",
            "--url",
            url,
            "--model",
            model,
            "--protocol",
            protocol,
            "-c",
            "2",
            "-d",
            "0.5",
            "--warmup",
            "0.2",
            "--engine",
            "python",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [run] = json.loads(out.read_text())["runs"]
    assert run["protocol"] == protocol
    assert run["errors"] == 0 and run["first_error"] is None
    assert run["requests"] > 10 and run["infer_per_s"] > 0
    assert 0 < run["p50_ms"] <= run["p99_ms"]
    assert f"{protocol} c=2 infer/s=" in proc.stdout


def test_perf_sweeps_concurrency_and_writes_csv(server, tmp_path):
    """A sweep of two concurrencies, 1 s each: one printed line and one CSV row per level,
    each with its own measured figures."""
    out = tmp_path / "sweep.csv"
    proc = subprocess.run(
        [DESPINA, "perf", "--url", f"http://{server.url}", "--model", "simple"]
        + ["--protocol", "http-binary", "--sweep", "1,4", "-d", "1", "--warmup", "0.3"]
        + ["--csv-out", str(out), "--label", "sweep"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " infer/s=" in line]
    assert [line.split()[0:2] for line in lines] == [["http-binary", "c=1"], ["http-binary", "c=4"]]
    rows = list(csv.DictReader(out.open()))
    assert [int(r["concurrency"]) for r in rows] == [1, 4]
    for row in rows:
        assert row["label"] == "sweep" and row["errors"] == "0"
        assert float(row["infer_per_s"]) > 0 and int(row["requests"]) > 10
        assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"])
    assert "# simple via http://" in proc.stderr  # the setup line: the model's inputs found


def test_perf_refuses_a_rate_on_streams(server):
    proc = subprocess.run(
        [DESPINA, "perf", "--url", server.grpc_url, "--model", "simple"]
        + ["--protocol", "grpc-stream", "--rate", "100", "-d", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "grpc-stream runs closed loop only" in proc.stderr


def test_ab_compares_two_settings_on_real_servers(tmp_path):
    """loadtest/ab.py starts one server per arm (the second serves git HEAD's code from an
    exported copy), drives each load against each arm, and ends with a table of medians
    and ratios against the first arm."""
    if not (LOADTEST.parent / ".git").exists():
        pytest.skip("the second arm serves git HEAD's code: needs a git checkout")
    out = tmp_path / "ab.txt"
    proc = subprocess.run(
        [
            sys.executable,
            str(LOADTEST / "ab.py"),
            "--arm",
            "off=--busy-poll-us=0",
            "--arm",
            "head@HEAD=",
            "--load",
            "simple:http-binary:1",
            "--rounds",
            "1",
            "-d",
            "0.5",
            "--warmup",
            "0.2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=LOADTEST,
    )
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    runs = [line for line in lines if line.startswith("round=1 ")]
    assert [line.split()[1] for line in runs] == ["arm=off", "arm=head"]
    assert all("errors=0" in line for line in runs)
    rows = [line.split(" | ") for line in lines if line.startswith("| simple http-binary c=1 |")]
    assert [row[1] for row in rows] == ["off", "head"]
    assert rows[0][-1] == "1.00 |"
    for row in rows:
        assert float(row[2].replace(",", "")) > 0  # infer/s measured


def test_stalls_measures_attacks_on_a_real_server(tmp_path):
    """loadtest/experiments/stalls.py serves the shipped repository, runs the named attacks while its
    bystanders infer, and ends with one table row per attack: the attacker's answer and
    figures for both bystanders (the figures are measured, not judged here)."""
    out = tmp_path / "stalls.md"
    proc = subprocess.run(
        [sys.executable, str(LOADTEST / "experiments" / "stalls.py"), "--rounds", "1"]
        + ["--only", "header,hpack", "--baseline-s", "0.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| `")]
    assert [row[0].split("`")[1] for row in rows] == ["header", "hpack"]
    assert [row[1] for row in rows] == ["431", "RESOURCE_EXHAUSTED x64"]
    for row in rows:
        assert float(row[2]) >= 0  # the attack's seconds
        for pair in row[3:6]:  # HTTP, gRPC and baseline p99 / worst, in ms
            p99, worst = (float(x.replace(",", "")) for x in pair.split(" / "))
            assert 0 < p99 <= worst
        assert row[6] in ("met |", "**not met** |")
    assert "bystander errors: http=0 grpc=0" in out.read_text()


def test_compare_rebuilds_its_summary_from_a_raw_run(server, tmp_path):
    """`loadtest/compare --summarize RAW.json` starts nothing and writes the .md table and
    the .png plot the README shows. The raw run here holds two real `despina perf` records
    (add_sub, HTTP JSON, c=1 and c=8) as both servers' rounds."""
    record = tmp_path / "perf.json"
    subprocess.run(
        [DESPINA, "perf", "--url", f"http://{server.url}", "--model", "add_sub"]
        + ["--sweep", "1,8", "-d", "0.5", "--warmup", "0.2", "--json-out", str(record)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    c1, c8 = json.loads(record.read_text())["runs"]
    row = {"load": "HTTP JSON c=1", "metric": "infer/s", "better": "higher"}
    row |= {"Despina": c1["infer_per_s"], "Triton": c8["infer_per_s"]}
    row["Despina/Triton"] = round(c1["infer_per_s"] / c8["infer_per_s"], 2)
    machine = {"date": "2026-12-03T16:00:00", "cpu_model": "cpu", "nproc": 2}
    machine |= {"despina_git": "abc1234", "versions": {"Triton": "2.51.0"}}
    doc = {
        "machine": machine,
        "settings": {"rounds": 1, "duration_s": 0.5, "warmup_s": 0.2},
        "notes": {"messages": ["a note"]},
        "summary": [row],
        "runs": {
            "Despina": [{"http_c1": c1, "http_c8": c8}],
            "Triton": [{"http_c1": c8, "http_c8": c1}],
        },
    }
    raw = tmp_path / "raw" / "compare-20261203-160000-test.json"
    raw.parent.mkdir()
    raw.write_text(json.dumps(doc))
    out = tmp_path / "summary"
    proc = subprocess.run(
        [sys.executable, str(LOADTEST / "compare"), "--summarize", str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    md = (out / "compare-20261203-160000-test.md").read_text().splitlines()
    assert md[0].startswith("2026-12-03T16:00:00  cpu  nproc=2  Despina abc1234  Triton 2.51.0")
    [table_row] = [line for line in md if line.startswith("| HTTP JSON c=1")]
    cells = [c.strip() for c in table_row.strip("|").split("|")]
    assert cells[:2] == ["HTTP JSON c=1", "infer/s"]
    assert cells[4] == f"{row['Despina/Triton']:.2f}"
    assert md[-1] == "- a note"
    png = (out / "compare-20261203-160000-test.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
