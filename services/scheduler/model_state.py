"""The models explicit model control has loaded, kept in a small file so that a scheduler
started again (after a crash, or restarted by ``despina serve``) loads the same ones, with
the same load-time overrides.

The file (``<--state-dir>/model-control.json``) is a JSON object ``{"models": {name:
parameters}}``: each loaded model with the parameters of the load that made it serve
(``{}`` for one loaded at start, else the load's ``config`` and ``file:...`` overrides,
as the client sent them). It is written whole after every successful load and unload
(write to a temporary file, fsync, rename: a crash leaves the old file or the new one,
never half of one), read once at start. Control-plane work only: no request reads it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import orjson

log = logging.getLogger("despina.scheduler")

FILE_NAME = "model-control.json"


class ModelState:
    """Owns the state file in ``folder``; not thread-safe (the scheduler's loop only)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE_NAME
        self.models: dict[str, dict] = {}

    def read(self) -> dict[str, dict] | None:
        """The models the file names, with their load parameters; None when there is no
        file (a first start) or it cannot be read (logged: the start-up flags decide)."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("cannot read the model-control state %s (ignored): %s", self.path, exc)
            return None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
            log.error("the model-control state %s is not what it should be (ignored)", self.path)
            return None
        self.models = models
        return dict(models)

    def loaded(self, name: str, parameters: dict) -> None:
        """``name`` serves, loaded with ``parameters``: write the file."""
        self.models[name] = parameters
        self._write()

    def unloaded(self, name: str) -> None:
        """``name`` no longer serves: write the file."""
        self.models.pop(name, None)
        self._write()

    def _write(self) -> None:
        write_state(self.path, {"models": self.models}, "model-control state")


def write_state(path: Path, data: dict, what: str) -> None:
    """``data`` as the whole JSON file ``path``, atomically (a temporary file beside it,
    fsync, rename: a crash leaves the old file or the new one); a failure is logged
    naming ``what`` (serving goes on)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.error("cannot write the %s %s: %s", what, path, exc)
