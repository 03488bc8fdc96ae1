"""Cache-sized blocks: run a foreach update rule over pieces of the tensors that stay in cache.

On CPU a foreach op is a C++ loop of per-tensor ops, so a rule of k ops over a 20M-element bucket makes
k passes over main memory, each streaming every tensor it touches. Cut into blocks of about
:data:`BLOCK_NUMEL` elements (flat views of contiguous tensors; small tensors packed together), the same
k ops run block by block: the block's parameters, gradients, state and temporaries stay in the core's
L2 cache between ops, main memory sees one read of the inputs and one write of the outputs, and each
temporary is block-sized (no gradient-sized allocation per step). Every element goes through exactly the
same operations in the same order, so the results are bit-identical to the whole-list rule.

Elsewhere (CUDA: one multi-tensor launch per op is what is fast) and for non-contiguous tensors the lists
stay whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: Elements per block and list: 128K fp32 = 512 KiB per list, so a rule's ~6 inputs and ~3 temporaries stay
#: in L2/L3 (measured on this project's 2-core machine, 1 MiB L2 per core, 8 MiB L3: 64K-256K within noise of
#: each other and about 2x the whole-list rule at 20M params; 16K and 32K lose to per-op overhead).
BLOCK_NUMEL = 1 << 17

Block = tuple[list[int], list[list[Tensor]]]


def block_numel_for(threads: int | None = None, base: int = BLOCK_NUMEL) -> int:
    """Elements per block for ``threads`` intra-op threads (default: torch's current count): ``base`` per thread,
    so that each thread's share of an op stays in its own core's cache and the block count (one fork and join
    of the threads per op and block) shrinks as the thread count grows."""
    return base * max(1, threads if threads is not None else torch.get_num_threads())


def split_blocks(lists: Sequence[Sequence[Tensor]], block_numel: int | None = None) -> list[Block]:
    """Cut aligned lists (``lists[k][i]`` all of one shape) into blocks of at most ``block_numel`` elements.

    Each block is ``(owners, views)``: ``views[k]`` holds pieces of ``lists[k]`` and ``owners[j]`` is the
    index ``i`` of the tensor piece ``j`` belongs to. A tensor larger than a block is cut into flat views
    when all its aligned tensors are contiguous (then element ``e`` of every view is the same element);
    pieces and small tensors are packed in order. Non-CPU tensors give one block of the whole lists.
    """
    count = len(lists[0])
    block_numel = block_numel or block_numel_for()
    if not count or lists[0][0].device.type != "cpu":
        return [(list(range(count)), [list(ts) for ts in lists])]
    blocks: list[Block] = []
    owners: list[int] = []
    columns: list[list[Tensor]] = [[] for _ in lists]
    size = 0
    for i in range(count):
        aligned = [ts[i] for ts in lists]
        numel = aligned[0].numel()
        if numel > block_numel and all(t.is_contiguous() for t in aligned):
            pieces = [t.view(-1).split(block_numel) for t in aligned]
        else:
            pieces = [(t,) for t in aligned]
        for j in range(len(pieces[0])):
            piece = pieces[0][j].numel()
            if owners and size + piece > block_numel:
                blocks.append((owners, columns))
                owners, columns, size = [], [[] for _ in lists], 0
            owners.append(i)
            for column, cut in zip(columns, pieces):
                column.append(cut[j])
            size += piece
    if owners:
        blocks.append((owners, columns))
    return blocks


def pick(values: Sequence[Tensor], owners: Sequence[int]) -> list[Tensor]:
    """Per-tensor scalars (0-d tensors) repeated for each piece of a block."""
    return [values[i] for i in owners]


def is_split(blocks: Sequence[Block], count: int) -> bool:
    """Whether ``blocks`` cut the lists at all (False: one block holding the ``count`` whole tensors)."""
    return not (len(blocks) == 1 and len(blocks[0][0]) == count)


class Scratch:
    """Persistent block-sized buffers for a rule's temporaries, per (device, dtype); CPU only.

    A fresh tensor above glibc's mmap threshold (128 KiB) is a fresh mapping: measured 4x the cost of the
    same op in place, all page faults. A block that is one flat piece takes its temporaries from here (views
    of ``count`` buffers of one block, allocated once: ``count`` x 512 KiB per thread in fp32);
    a block of several small tensors allocates them (small allocations come from the heap, cheaply).
    """

    def __init__(self, block_numel: int | None = None) -> None:
        self.block_numel = block_numel  # None: block_numel_for() at each take
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def take(self, pieces: Sequence[Tensor], count: int) -> list[Tensor | None]:
        """``count`` temporaries shaped like the block's only piece, or Nones (allocate) for other blocks."""
        width = self.block_numel or block_numel_for()
        piece = pieces[0] if len(pieces) == 1 else None
        if piece is None or piece.device.type != "cpu" or piece.numel() > width or not piece.is_contiguous():
            return [None] * count
        key = (piece.device, piece.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < count or buffer.shape[1] < piece.numel():
            rows = max(count, 0 if buffer is None else buffer.shape[0])
            columns = max(piece.numel(), 0 if buffer is None else buffer.shape[1])  # grows to the largest piece
            buffer = self._buffers[key] = torch.empty(rows, columns, device=piece.device, dtype=piece.dtype)
        return [row[: piece.numel()].view(piece.shape) for row in buffer[:count]]

    def nbytes(self) -> int:
        """Bytes held (for benchmarks' memory columns)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def fresh(out: Tensor | None, foreach_op: Callable[..., list[Tensor]], op: Callable[..., Tensor], *args: Any,
          **kwargs: Any) -> list[Tensor]:
    """``foreach_op(*args)`` (fresh tensors), or for a one-piece block ``[op(*firsts, out=out)]``: the same
    kernel per element (on CPU a foreach op runs ``op`` per tensor), so the same bits, without an allocation.
    ``args`` are lists (their first element is taken) or plain values."""
    if out is None:
        return foreach_op(*args, **kwargs)
    firsts = [a[0] if isinstance(a, (list, tuple)) else a for a in args]
    return [op(*firsts, out=out, **kwargs)]
