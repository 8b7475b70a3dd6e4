"""Which version a request runs on, with Triton's messages. Pure functions; the checks
of the request itself are in common/validate.py (frontends on direct routes run them too)."""

from __future__ import annotations

from despina.common.errors import Code, ServerError, unavailable
from despina.services.scheduler.repository import Model


def resolve_version(model: Model, version: str) -> str:
    """The version a request runs on; NOT_FOUND / UNAVAILABLE as Triton says them."""
    if model.config is None:
        raise ServerError(
            Code.UNAVAILABLE,
            f"Request for unknown model: '{model.name}' has no available versions ({model.error})",
        )
    if not version:
        v = model.default_version()
        if v is None:
            raise _unavailable(model)
        return v
    mv = model.versions.get(version)
    if mv is None:
        raise ServerError(
            Code.NOT_FOUND,
            f"Request for unknown model: '{model.name}' version {version} is not found",
        )
    if mv.state.value != "READY":
        raise _unavailable(model, version)
    return version


def _unavailable(model: Model, version: str = "") -> ServerError:
    reasons = "; ".join(mv.reason for mv in model.versions.values() if mv.reason)
    which = f"version {version} is not ready" if version else "has no available versions"
    return unavailable(
        f"Request for unknown model: '{model.name}' {which}" + (f" ({reasons})" if reasons else "")
    )
