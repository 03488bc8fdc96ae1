"""Which parameters get memory-lean AdamW state, how it is created, converted and checked.

The rule (:func:`lean_kind`): a parameter gets the group's ``state_dtype`` (``"bfloat16"`` or
``"int8"``) when it is a float32/bf16/fp16 tensor with at least two dimensions and at least the group's
``lean_min_numel`` elements (default 4096); every other parameter keeps fp32 moments. Shape, dimension
and element count are the *global* ones: for an FSDP2 DTensor ``p.shape`` and ``p.numel()`` are the
full parameter's, so the precision of a parameter never depends on the number of processes. 1-D
tensors (biases, norm weights) stay fp32: they are a tiny share of the memory, and it keeps every int8
block inside one row of dim 0 (the dim FSDP2 shards), see :mod:`lightning_optkit.kernels.lean_codec`.

State layout (per parameter, in the ``state_dict`` under torch's AdamW keys):

* ``"bfloat16"``: ``exp_avg`` and ``exp_avg_sq`` bf16, shaped like the parameter.
* ``"int8"``: ``exp_avg`` int8 and ``exp_avg_sq`` uint8 codes shaped like the parameter (sharded like it),
  plus ``exp_avg_scale`` and ``exp_avg_sq_scale``, fp32 of shape ``(dim 0, blocks per row)``, sharded
  along dim 0 like the parameter.

:func:`to_adamw_state_dict` turns a lean ``state_dict`` into ``torch.optim.AdamW``'s fp32 format.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_optkit import internals
from lightning_optkit.errors import SpecError
from lightning_optkit.kernels import lean_codec as codec
from lightning_optkit.kernels.lean_adamw import state_kind

STATE_DTYPES = ("float32", "bfloat16", "int8")
DEFAULT_MIN_NUMEL = 4096
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")
_ELIGIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_state_dtype(field: str, value: Any) -> str:
    """``value`` if it names a state dtype (``torch.bfloat16`` is read as ``"bfloat16"``), else a SpecError."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "float": "float32"}
    if isinstance(value, str) and aliases.get(value.lower(), value.lower()) in STATE_DTYPES:
        return aliases.get(value.lower(), value.lower())
    raise SpecError(field, value, f"use one of {', '.join(repr(s) for s in STATE_DTYPES)} (fp32 moments, bf16 "
                    "moments with stochastic rounding, or blockwise int8 moments)",
                    problem="is not an optimizer state dtype")


def check_min_numel(field: str, value: Any) -> int:
    """``value`` if it is a non-negative int, else a SpecError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(field, value, "give a whole number of elements >= 0, e.g. 4096 (smaller tensors keep "
                        "fp32 state)", problem="is not an element count")
    return value


def lean_kind(p: Tensor, group: dict[str, Any]) -> str:
    """The state dtype parameter ``p`` of ``group`` gets, judged on its global shape (see module doc)."""
    wanted = group.get("state_dtype", "float32")
    if wanted == "float32" or p.dtype not in _ELIGIBLE_DTYPES or p.dim() < 2:
        return "float32"
    return wanted if p.numel() >= group.get("lean_min_numel", DEFAULT_MIN_NUMEL) else "float32"


def flat_offset(p: Tensor) -> int:
    """The flat index, in the whole parameter, of the first element of this rank's shard (0 unsharded)."""
    if not isinstance(p, DTensor) or p.numel() == 0:
        return 0
    offset = internals.dtensor_global_offset(p)
    flat, stride = 0, 1
    for size, first in zip(reversed(p.shape), reversed(offset)):
        flat += first * stride
        stride *= size
    return flat


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _scale_like(p: Tensor) -> Tensor:
    """A zero fp32 scale tensor for ``p``: ``(dim 0, blocks per row)``, a DTensor sharded like ``p``."""
    local = _local(p)
    rows = local.shape[0]
    blocks = codec.scale_shape(p.shape)[1]
    scale = torch.zeros((rows, blocks), dtype=torch.float32, device=local.device)
    if not isinstance(p, DTensor):
        return scale
    if any(not isinstance(pl, (Replicate, Shard)) or (isinstance(pl, Shard) and pl.dim != 0)
           for pl in p.placements):
        raise ValueError(f"int8 optimizer state needs parameters sharded along dim 0 (FSDP2's default) or "
                         f"replicated, got placements {p.placements}; use state_dtype='float32' for it")
    shape = codec.scale_shape(p.shape)
    return DTensor.from_local(scale, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))


def new_state(p: Tensor, kind: str) -> dict[str, Tensor]:
    """Zero moments for ``p`` in ``kind``'s layout (no ``step``)."""
    if kind == "float32":
        dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        return {"exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)}
    if kind == "bfloat16":
        return {key: torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                for key in ("exp_avg", "exp_avg_sq")}
    return {"exp_avg": torch.zeros_like(p, dtype=torch.int8, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format),
            "exp_avg_scale": _scale_like(p), "exp_avg_sq_scale": _scale_like(p)}


def dequantize(state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """fp32 ``(exp_avg, exp_avg_sq)`` of one parameter's state in any layout (local tensors)."""
    m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
    if state_kind(state) != "int8" and v.dtype != torch.uint8:
        return m.float(), v.float()
    mm = torch.empty(m.shape, dtype=torch.float32, device=m.device)
    root = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    if m.numel():
        codec.decode_signed(codec.rows(m.contiguous()), _local(state["exp_avg_scale"]).float(), codec.rows(mm))
        codec.decode_root(codec.rows(v.contiguous()), _local(state["exp_avg_sq_scale"]).float(),
                          codec.rows(root))
    return mm, root.mul_(root)


def quantize_into(state: dict[str, Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """Write fp32 moments (local tensors) into ``state``'s layout, in place (round to nearest)."""
    kind = state_kind(state)
    m_dst, v_dst = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
    if kind != "int8":
        m_dst.copy_(exp_avg)
        v_dst.copy_(exp_avg_sq)
        return
    if not m_dst.numel():
        return
    codec.encode_signed(codec.rows(exp_avg.float().contiguous()), codec.rows(m_dst),
                        _local(state["exp_avg_scale"]))
    codec.encode_root(codec.rows(exp_avg_sq.float().clamp_min(0).sqrt().contiguous()), codec.rows(v_dst),
                      _local(state["exp_avg_sq_scale"]))


def restore(p: Tensor, kind: str, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """``p``'s moments in ``kind``'s layout from a checkpoint's tensors of any layout.

    The same layout is copied bit for bit (resume is exact); another one goes through fp32 (an fp32
    torch AdamW checkpoint loaded into int8 state is quantized; an int8 one loaded as fp32 dequantized).
    """
    state = new_state(p, kind)
    saved_kind = "int8" if "exp_avg_scale" in saved else ("bfloat16" if saved["exp_avg"].dtype ==
                                                           torch.bfloat16 else "float32")
    if saved_kind == kind:
        for key, value in state.items():
            _local(value).copy_(_local(saved[key]).to(_local(value).device))
        return state
    m, v = dequantize({k: t.to(_local(p).device) for k, t in saved.items()})
    quantize_into(state, m, v)
    return state


def to_adamw_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A FusedAdamW ``state_dict`` with lean state, converted to ``torch.optim.AdamW``'s fp32 format.

    Moments are dequantized to fp32, the scale tensors dropped, and the groups' ``state_dtype`` and
    ``lean_min_numel`` removed, so ``torch.optim.AdamW(...).load_state_dict(to_adamw_state_dict(sd))``
    continues from the lean run's moments. The input is not modified.
    """
    out_state = {}
    for index, st in state_dict["state"].items():
        st = dict(st)
        if "exp_avg" in st and (state_kind(st) != "float32" or "exp_avg_scale" in st):
            st["exp_avg"], st["exp_avg_sq"] = dequantize(st)
        for key in SCALE_KEYS:
            st.pop(key, None)
        out_state[index] = st
    groups = [{k: v for k, v in g.items() if k not in ("state_dtype", "lean_min_numel")}
              for g in state_dict["param_groups"]]
    return {"state": out_state, "param_groups": groups}
