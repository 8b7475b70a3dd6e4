"""Logging setup shared by every service: one line per event, service name first."""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, verbose: int = 0) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s.%(msecs)03d {service}[%(process)d] %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
