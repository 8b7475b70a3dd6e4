"""Process helpers shared by the supervisors (``despina serve`` and the Python launcher)."""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import signal
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``preexec_fn``: the kernel sends the child SIGTERM when its parent dies, so no
    service outlives the process that supervises it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def call_forked(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, computed in a forked child and its result (or exception) sent back
    pickled: what ``fn`` imports stays out of this long-lived process (protobuf, to read
    model configs, is ~5 MiB of RSS that the supervisor and the Python launcher would
    otherwise hold for good, and pass on to every process they fork). Computed here
    instead when forking fails or the child dies without an answer.

    The caller must not hold locks other threads of its own need, as for any fork."""
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return fn(*args)
    if pid == 0:  # the child: answer, then leave without running the parent's exit code
        try:
            os.close(read_end)
            try:
                answer = pickle.dumps((True, fn(*args)))
            except Exception as exc:
                try:
                    answer = pickle.dumps((False, exc))
                    pickle.loads(answer)  # some exceptions do not survive the trip
                except Exception:
                    answer = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            with os.fdopen(write_end, "wb") as out:
                out.write(answer)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer_file:
        answer = answer_file.read()
    os.waitpid(pid, 0)
    if not answer:
        return fn(*args)
    ok, value = pickle.loads(answer)
    if not ok:
        raise value
    return value


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc's
    ``malloc_trim``): resident but free memory a process would otherwise keep, and pass
    on to every process it forks."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
