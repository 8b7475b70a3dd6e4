"""The scale-out flags' pure parts: ``despina serve --backend-hosts`` (parse_backend_hosts,
hosts_for) and ``despina frontend --frontends N`` (each sibling's reply endpoint and
command line)."""

from __future__ import annotations

import argparse

import pytest

from despina.services.frontend.__main__ import add_arguments, nth_endpoint, sibling_argv
from despina.services.supervisor import hosts_for, parse_backend_hosts


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2", {"": 2}),
        ("onnxruntime=3", {"onnxruntime": 3}),
        ("onnxruntime=3, python=2", {"onnxruntime": 3, "python": 2}),
    ],
)
def test_backend_hosts_parsed(text, expected):
    assert parse_backend_hosts(text) == expected


@pytest.mark.parametrize("text", ["0", "onnxruntime=0", "=2", "onnxruntime=x", "", "-1"])
def test_backend_hosts_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_backend_hosts(text)


def test_hosts_for_a_framework():
    flags = [parse_backend_hosts("2"), parse_backend_hosts("onnxruntime=3")]
    assert hosts_for(flags, "onnxruntime") == 3
    assert hosts_for(flags, "python") == 2
    assert hosts_for(None, "python") == 1
    assert hosts_for([parse_backend_hosts("onnxruntime=3")], "python") == 1
    # later flags win
    assert hosts_for([{"onnxruntime": 3}, {"onnxruntime": 1}], "onnxruntime") == 1


@pytest.mark.parametrize(
    "endpoint, index, expected",
    [
        ("tcp://0.0.0.0:8011", 0, "tcp://0.0.0.0:8011"),
        ("tcp://0.0.0.0:8011", 2, "tcp://0.0.0.0:8013"),
        ("tcp://frontend:8011", 1, "tcp://frontend:8012"),
        ("tcp://[::1]:9000", 1, "tcp://[::1]:9001"),
        ("unix:///run/despina/frontend", 1, "unix:///run/despina/frontend-1"),
        ("ipc:///tmp/f", 3, "ipc:///tmp/f-3"),
        ("tcp://127.0.0.1:0", 2, "tcp://127.0.0.1:0"),  # any free port, each its own
    ],
)
def test_nth_endpoint(endpoint, index, expected):
    assert nth_endpoint(endpoint, index) == expected


@pytest.mark.parametrize("endpoint", ["tcp://host", "frontend:8011", "tcp://h:65535"])
def test_nth_endpoint_refused(endpoint):
    with pytest.raises(ValueError):
        nth_endpoint(endpoint, 1)


def test_sibling_argv_overrides_the_parents_flags():
    """A sibling's command line parses to the parent's settings, with its own reply
    endpoints, one process and the shared port."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [
        "--frontends=2",
        "--reply-endpoint=tcp://0.0.0.0:8011",
        "--advertise-endpoint=tcp://frontend:8011",
        "--http-port=8000",
    ]
    parent = parser.parse_args(argv)
    child = parser.parse_args(sibling_argv(argv, parent, 1))
    assert child.frontends == 1
    assert child.reuse_port is True
    assert child.reply_endpoint == "tcp://0.0.0.0:8012"
    assert child.advertise_endpoint == "tcp://frontend:8012"
    assert child.http_port == 8000
    first = parser.parse_args(sibling_argv(argv, parent, 0))
    assert (first.reply_endpoint, first.advertise_endpoint) == (
        "tcp://0.0.0.0:8011",
        "tcp://frontend:8011",
    )


def test_sibling_argv_default_reply_ports_take_any_free_port():
    """With neither reply flag, the first frontend binds the default port and the others
    any free port: port + 1 of the default is the scheduler's own port (8012) on the same
    machine, where ``despina frontend --frontends 2`` used to stop with 'address already
    in use'."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--frontends=3"]
    parent = parser.parse_args(argv)
    endpoints = [parser.parse_args(sibling_argv(argv, parent, i)).reply_endpoint for i in range(3)]
    assert endpoints == ["tcp://0.0.0.0:8011", "tcp://0.0.0.0:0", "tcp://0.0.0.0:0"]
    # An advertised endpoint alone keeps port + i on both (the operator maps the ports).
    argv = ["--frontends=2", "--advertise-endpoint=tcp://frontend:8011"]
    parent = parser.parse_args(argv)
    child = parser.parse_args(sibling_argv(argv, parent, 1))
    assert (child.reply_endpoint, child.advertise_endpoint) == (
        "tcp://0.0.0.0:8012",
        "tcp://frontend:8012",
    )
