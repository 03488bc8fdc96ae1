"""Batched gradient/parameter norms with foreach ops and no host sync.

Sparse COO tensors (``nn.Embedding(sparse=True)`` gradients) are normed through their coalesced values.
Every result stays on the tensors' device, in float32 (float64 for float64 tensors, as torch's own
clipping computes them, so a float64 run neither overflows at 3.4e38 nor rounds differently), so
callers can combine norms into clip coefficients or skip flags without a ``.item()``. Tensors are
grouped by (device, dtype) so each group is one ``torch._foreach_norm`` launch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lightning_optkit.sharding import all_reduce_partials, any_sharded, local_tensors

__all__ = [
    "CLIP_EPS",
    "check_norm_type",
    "clip_coefficient",
    "combine_norms",
    "group_by_device_dtype",
    "params_by_module_prefix",
    "sparse_values",
    "tensor_norms",
    "total_norm",
]


DeviceDtype = tuple[torch.device, torch.dtype]

#: Added to the norm in a clip coefficient, as ``torch.nn.utils.clip_grad_norm_`` does.
CLIP_EPS = 1e-6


def group_by_device_dtype(tensors: Sequence[torch.Tensor]) -> dict[DeviceDtype, list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, in first-seen order."""
    groups: dict[DeviceDtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return dict(groups)


def check_norm_type(norm_type: float) -> float:
    """Return ``norm_type`` as a float, or raise ValueError unless it is a positive p or +inf."""
    value = float(norm_type)
    if not value > 0:  # rejects 0, negatives, -inf and NaN
        raise ValueError(
            f"norm_type={norm_type!r} is invalid. Fix: use a positive p (e.g. 2.0) or float('inf')."
        )
    return value


def _one_group(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether all ``tensors`` share one device and dtype (the common case, checked cheaply)."""
    first = tensors[0]
    dtype, device = first.dtype, first.device
    return all(t.dtype == dtype for t in tensors) and all(t.device == device for t in tensors)


def tensor_norms(tensors: Iterable[torch.Tensor], norm_type: float = 2.0,
                 shards_of: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The p-norm of each tensor as a 0-d tensor on that tensor's device, in input order.

    One ``torch._foreach_norm`` per (device, dtype) group; float64 inputs give float64 norms, all others
    float32 (bf16/fp16 gradients are normed in float32 so they do not overflow or lose precision).

    Sharded tensors (FSDP2 DTensors) get the norm of the whole tensor, the same on every rank: local
    norms of the shards, then one all-reduce of all of them (see :mod:`lightning_optkit.sharding`).
    ``shards_of`` says that ``tensors`` are the local shards of those DTensors (as an optimizer's
    update sees them). Every rank must make the same call.
    """
    norm_type = check_norm_type(norm_type)
    tensors = list(tensors)  # gradients never require grad; foreach_norm reads them as they are
    if not tensors:
        return []
    if any(t.is_sparse for t in tensors):
        tensors = [sparse_values(t) if t.is_sparse else t for t in tensors]
    like = tensors if shards_of is None else shards_of
    if any_sharded(like):
        return _whole_norms(list(local_tensors(tensors)), like, norm_type)
    if _one_group(tensors):  # one launch, no regrouping
        return _group_norms(tensors, norm_type)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for _, idx in group_by_device_dtype(tensors).items():
        for i, n in zip(idx, _group_norms([tensors[i] for i in idx], norm_type), strict=True):
            out[i] = n
    return out  # type: ignore[return-value]


def sparse_values(tensor: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse COO tensor, whose p-norm is the tensor's (the implicit entries are 0).

    Duplicate indices are summed first (``coalesce``; free for an already coalesced tensor, such as the
    gradients the kit's callbacks coalesce once per step). An empty result is one zero, whose norm is 0
    for every p (the inf-norm of an empty tensor is undefined).
    """
    values = (tensor if tensor.is_coalesced() else tensor.coalesce()).values()
    return values if values.numel() else values.new_zeros(1)


def _whole_norms(shards: list[torch.Tensor], like: Sequence[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Whole-tensor norms from the local ``shards`` of ``like``: one collective for all of them.

    The partial sums of powers are reduced in float64, so squares of float32 norms cannot overflow.
    The inf-norm is a max-reduce; a NaN in any shard is carried by a separate flag in the same
    collective (a max-reduce may drop NaN), so it reaches every rank's norm.
    """
    local = tensor_norms(shards, norm_type)
    stacked = torch.stack([n.to(local[0].device, torch.float64) for n in local])
    if math.isinf(norm_type):
        nan = torch.isnan(stacked)
        buffer = torch.cat([torch.where(nan, math.inf, stacked), nan.double()])
        all_reduce_partials(buffer, [*like, *like], op="max")
        n = len(local)
        whole = torch.where(buffer[n:] > 0, math.nan, buffer[:n])
    else:
        powers = stacked * stacked if norm_type == 2.0 else stacked.pow(norm_type)
        all_reduce_partials(powers, like, op="sum")
        whole = powers.sqrt() if norm_type == 2.0 else powers.pow(1.0 / norm_type)
    return [w.to(n.device, n.dtype) for w, n in zip(whole.unbind(), local, strict=True)]


def _group_norms(group: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    dtype = group[0].dtype
    if dtype in (torch.float32, torch.float64):
        return list(torch._foreach_norm(group, norm_type))
    if dtype in (torch.float16, torch.bfloat16):
        return list(torch._foreach_norm(group, norm_type, dtype=torch.float32))
    return [n.float() for n in torch._foreach_norm(group, norm_type)]


def combine_norms(norms: Sequence[torch.Tensor], norm_type: float = 2.0,
                  device: torch.device | None = None) -> torch.Tensor:
    """Combine per-tensor p-norms into the p-norm of their concatenation (0-d on ``device``; float64 if
    any input is, else float32)."""
    norm_type = check_norm_type(norm_type)
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    device = device if device is not None else norms[0].device
    if norms[0].device == device and _one_group(norms) and norms[0].dtype in (torch.float32, torch.float64):
        stacked = torch.stack(list(norms))
    else:
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        stacked = torch.stack([n.to(device, dtype) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, norm_type)


def total_norm(tensors: Iterable[torch.Tensor], norm_type: float = 2.0,
               device: torch.device | None = None) -> torch.Tensor:
    """The p-norm of all ``tensors`` viewed as one vector, as a 0-d device tensor (float64 if any is).

    Matches ``torch.nn.utils.get_total_norm`` (inf-norm: the max absolute value; NaN/inf
    propagate). ``device`` defaults to the first tensor's device; an empty input gives 0.
    """
    tensors = list(tensors)
    if device is None and tensors:
        device = tensors[0].device
    return combine_norms(tensor_norms(tensors, norm_type), norm_type, device)


def clip_coefficient(limit: torch.Tensor | float, norm: torch.Tensor) -> torch.Tensor:
    """``min(1, limit / (norm + 1e-6))`` as torch computes it, but NaN when ``norm`` is not finite.

    torch gives 0 for an infinite norm, which zeroes finite entries and turns the update into
    finite garbage; NaN keeps a broken gradient visibly broken, so a non-finite skip wins.
    """
    denominator = norm + CLIP_EPS
    # reciprocal * limit is what torch's ``limit / tensor`` computes, so the coefficient is bit-equal to
    # clip_grad_norm_'s. denominator / denominator is 1 for a finite norm (never 0/0: it is at least
    # 1e-6) and NaN for inf/NaN, and minimum() propagates NaN.
    return torch.minimum(denominator.reciprocal() * limit, denominator / denominator)


def params_by_module_prefix(module: nn.Module, depth: int = 1,
                            only_with_grad: bool = False) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped by the first ``depth`` components of their dotted name.

    ``depth=1`` groups ``encoder.layer.0.weight`` under ``"encoder"``; a parameter whose name has
    fewer components keeps its module path (``"bias"`` at top level is grouped under ``""``).
    Shared parameters appear once, under their first name. With ``only_with_grad`` only
    parameters holding a ``.grad`` are returned.
    """
    if depth < 1:
        raise ValueError(f"depth={depth!r} is invalid. Fix: use an integer >= 1.")
    groups: dict[str, list[nn.Parameter]] = defaultdict(list)
    for name, p in module.named_parameters():
        if only_with_grad and p.grad is None:
            continue
        parts = name.split(".")[:-1]  # module path without the parameter's own name
        groups[".".join(parts[:depth])].append(p)
    return dict(groups)
