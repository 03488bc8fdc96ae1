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

from collections.abc import Sequence

from torch import Tensor

#: Elements per block and list: 64K fp32 = 256 KiB, so a rule's ~6 inputs and ~3 temporaries fit the
#: 1-2 MiB L2 of one core (measured on 2 cores: 64K-256K within noise of each other, 2x the whole-list rule).
BLOCK_NUMEL = 1 << 16

Block = tuple[list[int], list[list[Tensor]]]


def split_blocks(lists: Sequence[Sequence[Tensor]], block_numel: int = BLOCK_NUMEL) -> list[Block]:
    """Cut aligned lists (``lists[k][i]`` all of one shape) into blocks of at most ``block_numel`` elements.

    Each block is ``(owners, views)``: ``views[k]`` holds pieces of ``lists[k]`` and ``owners[j]`` is the
    index ``i`` of the tensor piece ``j`` belongs to. A tensor larger than a block is cut into flat views
    when all its aligned tensors are contiguous (then element ``e`` of every view is the same element);
    pieces and small tensors are packed in order. Non-CPU tensors give one block of the whole lists.
    """
    count = len(lists[0])
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
