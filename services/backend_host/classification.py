"""Triton's classification extension: an output returned as its top-k classes.

Each class is the string ``"<value>:<index>"``, or ``"<value>:<index>:<label>"`` when
the output's ``label_filename`` gives labels (one per line, in the model folder), as
Triton formats it (values as C++ ``std::to_string`` writes them). The result is a BYTES
tensor of shape [batch, k] for a batching model, [k] otherwise. Pure functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from despina.common.errors import invalid_arg


def load_labels(model_dir: Path, label_filename: str) -> list[str]:
    if not label_filename:
        return []
    try:
        return (model_dir / label_filename).read_text().splitlines()
    except OSError as exc:
        raise invalid_arg(f"cannot read label file '{label_filename}': {exc}") from None


def _value(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):f}"
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    return str(v)


def classify(values: np.ndarray, k: int, batched: bool, labels: list[str], name: str) -> np.ndarray:
    """Top-``k`` classes of ``values`` per batch row, highest first."""
    if values.dtype == object:
        raise invalid_arg(f"classification is not possible on BYTES output '{name}'")
    rows = values.reshape(values.shape[0], -1) if batched else values.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        # Stable: among equal values the lower index comes first, as in Triton.
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for j, idx in enumerate(order):
            text = f"{_value(row[idx])}:{int(idx)}"
            if int(idx) < len(labels):
                text += f":{labels[int(idx)]}"
            out[r, j] = text.encode()
    return out if batched else out.reshape(k)
