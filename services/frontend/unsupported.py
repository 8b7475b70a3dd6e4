"""Triton's answers for what Despina does not serve yet: one error per feature, the same
on every protocol (HTTP 501 and gRPC UNIMPLEMENTED, as Triton's UNSUPPORTED maps)."""

from __future__ import annotations

from despina.common.errors import Code, ServerError

# Triton's own words for load/unload outside explicit mode (its qa tests match them).
MODEL_CONTROL = (
    "explicit model load / unload is not allowed if polling is enabled (Despina runs in "
    "model control mode 'none': every model in the repository is loaded at start)"
)


def unsupported(message: str) -> ServerError:
    return ServerError(Code.UNSUPPORTED, message)
