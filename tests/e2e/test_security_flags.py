"""Security flags fail closed (#12 item 9): a flag that would restrict what clients may
do, given to a server that cannot honour it (not supported, or a malformed value), stops
the server before it listens."""

from __future__ import annotations

import argparse
import socket

import pytest

from despina.services.flags import add_triton_flags, refuse_unsupported_security

from conftest import serve_refused


@pytest.mark.parametrize(
    "flags, says",
    [
        # The restriction flags act now (tests/e2e/test_restricted_api.py); a value that
        # cannot be honoured still stops the server.
        (
            ["--http-restricted-api=model-repository:admin-key"],
            "--http-restricted-api option format is '<api list>:<header>=<value>'",
        ),
        (
            ["--grpc-restricted-protocol", "shared-memory,registry:admin-key=secret"],
            "unknown restricted protocol 'registry'",
        ),
    ],
)
def test_unsupported_security_flag_stops_the_server(tmp_path, flags, says):
    done, http_port = serve_refused(tmp_path, *flags)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "refusing to start" in done.stderr
    # Nothing was served, not even for a moment after the refusal.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", http_port)) != 0


def test_explicit_mode_loading_every_model_is_safe(tmp_path):
    """Model control acts (tests/e2e/test_model_control.py): explicit mode, with
    ``--load-model=*`` or a named model, and poll mode are not refused."""
    parser = argparse.ArgumentParser()
    add_triton_flags(parser)
    args = parser.parse_args(
        ["--model-repository", str(tmp_path), "--model-control-mode=explicit", "--load-model=*"]
    )
    assert refuse_unsupported_security(args) == []
    args = parser.parse_args(
        ["--model-repository", str(tmp_path), "--model-control-mode=explicit", "--load-model=a"]
    )
    assert refuse_unsupported_security(args) == [] and args.load_model == ["a"]
    args = parser.parse_args(["--model-repository", str(tmp_path), "--model-control-mode=poll"])
    assert refuse_unsupported_security(args) == []
