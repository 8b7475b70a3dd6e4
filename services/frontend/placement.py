"""Where a request's tensors travel: inline on the socket, as a ref into the body block
the request was read into, in a block of the frontend's arena, or in a client's region.

``BodyBlock`` is the arena block an HTTP transport reads a large body into; ``place_inputs``
decides each input's ref (docs/architecture.md, "The zero-copy contract"): a tensor of at
least ``inline_threshold`` bytes is never copied on the socket; one already in the body
block travels as a ref into it, any other is copied once into the arena.
"""

from __future__ import annotations

import numpy as np

from despina.common import messages as m
from despina.common.errors import invalid_arg
from despina.common.shm.arena import ShmArena
from despina.services.frontend.inference import InferenceRequest


class BodyBlock:
    """An arena block a request body is read into. The transport reading the body owns
    it, then the request's ``InferCall``, until the wire takes it (``taken``: from then
    on it is one of the call's input blocks, freed with them)."""

    __slots__ = ("key", "offset", "view", "address", "taken")

    def __init__(self, key: str, offset: int, view: memoryview) -> None:
        self.key = key
        self.offset = offset
        self.view = view
        self.address = np.frombuffer(view, np.uint8).ctypes.data
        self.taken = False

    def ref_of(self, data: memoryview) -> m.Shm | None:
        """The block-relative ref of ``data`` when it is a slice of this block."""
        if not isinstance(data, memoryview):
            return None
        start = np.frombuffer(data, np.uint8).ctypes.data - self.address
        if 0 <= start and start + data.nbytes <= self.view.nbytes:
            return m.Shm(self.key, self.offset + start, data.nbytes)
        return None


def region_ref(parameters: dict, what: str) -> m.Region:
    """The client region a tensor's ``shared_memory_*`` parameters name."""
    name = parameters.get("shared_memory_region")
    size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if not isinstance(name, str) or not name:
        raise invalid_arg(f"'shared_memory_region' of {what} must be a region name")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid_arg(
            f"'shared_memory_byte_size' must be given, as a non-negative integer, for {what} "
            f"in shared memory region '{name}'"
        )
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise invalid_arg(f"'shared_memory_offset' of {what} must be a non-negative integer")
    return m.Region(name, offset, size)


def classification_counts(request: InferenceRequest) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in request.outputs:
        k = o.parameters.get("classification")
        if k is None:
            continue
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise invalid_arg(
                f"'classification' of output '{o.name}' must be a positive integer, got {k!r}"
            )
        counts[o.name] = k
    return counts


def place_inputs(
    request: InferenceRequest,
    body: BodyBlock | None,
    arena: ShmArena,
    inline_threshold: int,
    blocks: list[tuple[str, int]],
) -> tuple[list[m.Tensor], list, bool]:
    """(the wire tensors, their inline buffers aligned with them or None for a ref,
    whether any input is in a client region). Arena blocks it fills are appended to
    ``blocks`` as it goes, so the caller frees them if this raises."""
    tensors: list[m.Tensor] = []
    buffers: list = []
    regions = False
    for tensor in request.inputs:
        data = tensor.data
        if data is None:
            regions = True
            ref: m.TensorRef = region_ref(tensor.parameters, f"input '{tensor.name}'")
            buffers.append(None)
            tensors.append(m.Tensor(tensor.name, tensor.datatype, tensor.shape, ref))
            continue
        size = len(data) if isinstance(data, bytes) else data.nbytes
        in_body = body.ref_of(data) if body is not None and size >= inline_threshold else None
        if in_body is not None:
            ref = in_body  # already in shared memory: the body was read there
            buffers.append(None)
        elif size >= inline_threshold:
            key, offset, view = arena.allocate(size)
            blocks.append((key, offset))
            view[:size] = data
            ref = m.Shm(key, offset, size)
            buffers.append(None)
        else:
            ref = m.Inline(0)
            buffers.append(data)
        tensors.append(m.Tensor(tensor.name, tensor.datatype, tensor.shape, ref))
    return tensors, buffers, regions
