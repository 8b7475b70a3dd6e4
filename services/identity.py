"""Who the server says it is: Triton's identity to clients, Despina's own where no client
reads it.

Triton's example clients and qa tests check that ``GET /v2`` (and gRPC ``ServerMetadata``)
answers ``name == "triton"``, so the server metadata names Triton and the Triton release
whose behaviour Despina measures against and follows. Despina's own name and version go
where no client looks for Triton: ``despina --version``, the start-up log and the HTTP
``Server`` header (Triton sends none). A light module: the supervisor imports it.
"""

from __future__ import annotations

import argparse

DESPINA_NAME = "despina"
DESPINA_VERSION = "0.1.0"  # pyproject.toml's version (tests/e2e/test_compat_identity.py)
TRITON_NAME = "triton"
TRITON_VERSION = "2.51.0"  # the tritonserver release Despina is measured against
SERVER_HEADER = f"{DESPINA_NAME}/{DESPINA_VERSION}"


def describe() -> str:
    """One line naming Despina and the identity it answers with."""
    return (
        f"{DESPINA_NAME} {DESPINA_VERSION} "
        f"(answers as Triton Inference Server {TRITON_VERSION}, KServe v2 protocol)"
    )


def add_server_name(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--server-name",
        default=TRITON_NAME,
        metavar="NAME",
        help="Despina's own: the name in the server metadata (GET /v2, gRPC ServerMetadata); "
        "Triton's clients expect %(default)r",
    )
