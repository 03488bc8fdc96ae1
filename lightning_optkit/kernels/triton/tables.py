"""Pointer and chunk tables that let one Triton launch cover a whole list of tensors.

A *chunk table* splits every tensor into ``block``-element chunks: program ``c`` of the launch updates
elements ``chunk_start[c] : chunk_start[c] + block`` of tensor ``chunk_tensor[c]`` (``numels`` bounds the
last chunk). A *pointer table* holds each tensor's ``data_ptr()`` as int64; the kernel loads it and casts
it to a typed pointer. Tables live on the tensors' device and are cached by the exact pointers/sizes they
encode, so a cache hit is always correct and rebuilding happens only when storage moves (for example
gradients freed by ``zero_grad(set_to_none=True)`` and reallocated elsewhere).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_BLOCK = 4096


@dataclass(frozen=True)
class ChunkTable:
    """Per-program (tensor index, start offset) pairs plus per-tensor element counts, on device."""

    chunk_tensor: torch.Tensor  # int32 [n_chunks]
    chunk_start: torch.Tensor  # int64 [n_chunks]
    numels: torch.Tensor  # int64 [n_tensors]
    n_chunks: int
    n_tensors: int
    block: int


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple) -> object | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple, value: object) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


_CHUNKS = _LRU(32)
_POINTERS = _LRU(64)


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    # Pinned memory + non_blocking keeps the host-to-device copy asynchronous (no host sync).
    return host.pin_memory().to(device, non_blocking=True)


def chunk_table(numels: Sequence[int], device: torch.device, block: int = DEFAULT_BLOCK) -> ChunkTable:
    """The (cached) chunk table for tensors of ``numels`` elements on ``device``."""
    key = (tuple(numels), str(device), block)
    table = _CHUNKS.get(key)
    if table is None:
        tensor_ids: list[int] = []
        starts: list[int] = []
        for i, n in enumerate(numels):
            for start in range(0, n, block):
                tensor_ids.append(i)
                starts.append(start)
        table = ChunkTable(
            chunk_tensor=_to_device(tensor_ids, torch.int32, device),
            chunk_start=_to_device(starts, torch.int64, device),
            numels=_to_device(list(numels), torch.int64, device),
            n_chunks=len(starts),
            n_tensors=len(numels),
            block=block,
        )
        _CHUNKS.put(key, table)
    return table  # type: ignore[return-value]


def pointer_table(lists: Sequence[Sequence[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, bool]:
    """An int64 ``[len(lists), n]`` table of ``data_ptr()`` values (row ``r`` for ``lists[r]``), cached,
    and whether every pointer is 16-byte aligned (then the kernels may use vectorised accesses)."""
    ptrs = [t.data_ptr() for tensors in lists for t in tensors]
    key = (str(device), len(lists), *ptrs)
    entry = _POINTERS.get(key)
    if entry is None:
        table = _to_device(ptrs, torch.int64, device).view(len(lists), -1)
        entry = (table, all(ptr % 16 == 0 for ptr in ptrs))
        _POINTERS.put(key, entry)
    return entry  # type: ignore[return-value]
