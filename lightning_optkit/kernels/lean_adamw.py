"""AdamW over memory-lean state with torch ops (the CPU path, and wherever Triton does not run).

One call updates a list of parameters whose state is bf16 (moments stored with seeded stochastic
rounding), int8 (blockwise codes of :mod:`lightning_optkit.kernels.lean_codec`) or fp32 (used for bf16
parameters written with stochastic rounding). Math is fp32 in every case: decode, the AdamW update of
``torch.optim.AdamW``, encode.

Each tensor is processed in slices of whole rows of at most ``SLICE`` elements, so the fp32 working
copies never exceed a few MB whatever the model size (the memory saved by lean state is not spent again
on temporaries). Every number the step needs (lr, bias corrections, clip coefficient, skip flag, the hash
keys) stays a device tensor: no host sync. A skipped step leaves parameters, codes, scales and step
counters bit-identical (the new values are formed, then ``torch.where`` keeps the old ones); gradients
are never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_optkit.kernels import lean_codec as codec
from lightning_optkit.kernels import lean_native
from lightning_optkit.kernels.dispatch import PathLogger, select_backend

_log_path = PathLogger("lightning_optkit.kernels")

SLICE = 1 << 18  # elements of one working slice: ~8 fp32 temporaries of 1 MB each


@dataclass(frozen=True)
class LeanHyper:
    """The hyperparameters of one param group's lean AdamW step (``lr`` a float or 0-d tensor)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False


def state_kind(state: dict[str, Tensor]) -> str:
    """``"int8"``, ``"bfloat16"`` or ``"float32"``: how this state stores its moments."""
    dtype = state["exp_avg"].dtype
    return {torch.int8: "int8", torch.bfloat16: "bfloat16"}.get(dtype, "float32")


def _store_param(p: Tensor, new: Tensor, noise: Tensor | None) -> Tensor:
    """``new`` (fp32) in ``p``'s dtype: stochastic rounding to bf16 when ``noise`` is given."""
    if p.dtype == torch.float32:
        return new
    if noise is not None and p.dtype == torch.bfloat16:
        out = torch.empty_like(p)
        codec.to_bf16_stochastic(new, noise & 0xFFFF, out)
        return out
    return new.to(p.dtype)


def _write(dst: Tensor, new: Tensor, keep: Tensor | None) -> None:
    """``dst = new`` unless the step is skipped (``keep`` false), bit for bit either way."""
    dst.copy_(new if keep is None else torch.where(keep, new.to(dst.dtype), dst))


class _Slice:
    """Rows ``r0:r1`` of one tensor's ``(R, L)`` views: parameter, gradient and state."""

    def __init__(self, p: Tensor, g: Tensor, state: dict[str, Tensor], r0: int, r1: int) -> None:
        self.p = codec.rows(p)[r0:r1]
        self.g = codec.rows(g)[r0:r1]
        self.m = codec.rows(state["exp_avg"])[r0:r1]
        self.v = codec.rows(state["exp_avg_sq"])[r0:r1]
        self.m_scale = state["exp_avg_scale"][r0:r1] if "exp_avg_scale" in state else None
        self.v_scale = state["exp_avg_sq_scale"][r0:r1] if "exp_avg_sq_scale" in state else None
        self.first = r0 * self.p.shape[1]  # flat index of the slice's first element (for the noise)


def _load_moments(s: _Slice, kind: str) -> tuple[Tensor, Tensor]:
    """The slice's ``m`` and ``v`` as fresh fp32 tensors."""
    if kind == "int8":
        m = codec.decode_signed(s.m, s.m_scale, torch.empty(s.m.shape, device=s.m.device))
        root = codec.decode_root(s.v, s.v_scale, torch.empty(s.v.shape, device=s.v.device))
        return m, root.mul_(root)
    return s.m.float() if s.m.dtype != torch.float32 else s.m.clone(), s.v.float() if \
        s.v.dtype != torch.float32 else s.v.clone()


def _store_moments(s: _Slice, kind: str, m: Tensor, v: Tensor, root: Tensor, keep: Tensor | None,
                   key: Tensor | None) -> None:
    """Write the new fp32 moments back in the state's format (``root`` = sqrt(v), already computed)."""
    if kind == "int8":
        codes_m, scale_m = torch.empty_like(s.m), torch.empty_like(s.m_scale)
        codes_v, scale_v = torch.empty_like(s.v), torch.empty_like(s.v_scale)
        codec.encode_signed(m, codes_m, scale_m)
        codec.encode_root(root, codes_v, scale_v)
        for dst, new in ((s.m, codes_m), (s.v, codes_v), (s.m_scale, scale_m), (s.v_scale, scale_v)):
            _write(dst, new, keep)
        return
    if kind == "bfloat16":
        h = codec.hash_noise(s.first, m.numel(), key, m.device).view(m.shape)
        new_m, new_v = torch.empty_like(s.m), torch.empty_like(s.v)
        codec.to_bf16_stochastic(m, h & 0xFFFF, new_m)
        codec.to_bf16_stochastic(v, codec._shr(h, 16), new_v)
        m, v = new_m, new_v
    _write(s.m, m, keep)
    _write(s.v, v, keep)


def _slices(p: Tensor, g: Tensor, state: dict[str, Tensor]) -> list[_Slice]:
    n_rows = p.shape[0] if p.dim() else 1
    if p.numel() == 0:
        return []
    length = p.numel() // n_rows
    per = max(1, SLICE // max(length, 1))
    return [_Slice(p, g, state, r0, min(n_rows, r0 + per)) for r0 in range(0, n_rows, per)]


def lean_adamw(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]],
    salts: Sequence[int], hyper: LeanHyper, *, grad_scale: Tensor | None = None, skip: Tensor | None = None,
    seed: int = 0, stochastic_params: bool = False, backend: str = "torch", path_log: PathLogger | None = None,
    offsets: Sequence[int] | None = None,
) -> None:
    """One AdamW step, in place, for contiguous local tensors with lean (or fp32) state.

    ``states[i]`` holds ``step`` (0-d fp32), ``exp_avg``/``exp_avg_sq`` (int8/uint8 codes shaped like the
    parameter plus ``exp_avg_scale``/``exp_avg_sq_scale``, or bf16/fp32 tensors). ``salts[i]`` tells the
    tensors apart in the stochastic-rounding hash (with ``seed`` and the step count). ``skip``: a 0-d
    tensor, nonzero skips. ``stochastic_params``: write bf16 parameters with stochastic rounding.
    ``backend`` (see :mod:`lightning_optkit.kernels.dispatch`) sends int8/bf16 groups that suit the
    Triton kernel there (one launch per device, dtype and layout); fp32-state ones always run here.
    ``offsets[i]``: the flat index of the local tensor's first element in the whole (FSDP2-sharded)
    parameter, so that the rounding noise is the unsharded run's (see :func:`lean_codec.tensor_key`).
    """
    if not params:
        return
    device = params[0].device
    keep = None if skip is None else skip.to(device).reshape(()).eq(0)
    steps = [st["step"] for st in states]
    increment = torch.ones((), device=device) if keep is None else keep.to(torch.float32)
    torch._foreach_add_(steps, increment)
    step64 = torch.stack(steps).to(torch.float64)
    lr = hyper.lr.to(device=device, dtype=torch.float64).reshape(()) if isinstance(hyper.lr, Tensor) else hyper.lr
    step_sizes = (lr / (1.0 - torch.pow(hyper.beta1, step64))).float()
    bc2_sqrts = (1.0 - torch.pow(hyper.beta2, step64)).sqrt().float()
    decay = (1.0 - lr * hyper.weight_decay) if isinstance(lr, Tensor) else None
    decay = decay.float() if decay is not None else 1.0 - hyper.lr * hyper.weight_decay
    mult = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32).reshape(())
    offsets = offsets or [0] * len(states)
    keys = [codec.tensor_key(seed, st["step"], 2 * salt, off) for st, salt, off in zip(states, salts, offsets)]
    param_keys = [codec.tensor_key(seed, st["step"], 2 * salt + 1, off) for st, salt, off in
                  zip(states, salts, offsets)] if stochastic_params else None
    launches: dict[tuple[torch.device, torch.dtype, str], list[int]] = {}
    lib = lean_native.library() if device.type == "cpu" else None
    native = _NativeArgs(hyper, step_sizes, bc2_sqrts, decay, mult, keep, keys, param_keys) if lib else None
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        kind = state_kind(state)
        tensors = (p, g, *state.values())
        path = "torch" if kind == "float32" else select_backend(
            backend, p.device, p.dtype, lambda tensors=tensors: all(t.is_contiguous() for t in tensors))
        if path == "torch" and native is not None and lean_native.suits(p, g, state, kind):
            path = "native"
        (path_log or _log_path)(p.device, p.dtype, f"adamw-{kind}/{path}")
        if path == "triton":
            launches.setdefault((p.device, p.dtype, kind), []).append(i)
            continue
        param_key = param_keys[i] if param_keys is not None and p.dtype == torch.bfloat16 else None
        if path == "native":
            lean_native.step(lib, p, g, state, kind, native.hyper[i], native.keys[i], maximize=hyper.maximize,
                             param_sr=param_key is not None)
            continue
        work = p if p.is_contiguous() else p.contiguous()
        for s in _slices(work, g.contiguous(), state):
            _update_slice(s, kind, hyper, step_sizes[i], bc2_sqrts[i], decay, mult, keep,
                          keys[i] if kind == "bfloat16" else None, param_key)
        if work is not p:
            p.copy_(work)
    for idx in launches.values():
        from lightning_optkit.kernels.triton.lean_adamw import triton_lean_adamw

        decay_t = decay if isinstance(decay, Tensor) else torch.full((), decay, device=device)
        triton_lean_adamw(
            [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx],
            torch.stack([step_sizes[i] for i in idx]), torch.stack([bc2_sqrts[i] for i in idx]), decay_t,
            beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps, maximize=hyper.maximize, grad_scale=mult,
            skip=None if keep is None else (~keep).to(torch.float32),
            moment_keys=torch.stack([keys[i] for i in idx]),
            param_keys=None if param_keys is None else torch.stack([param_keys[i] for i in idx]),
        )


class _NativeArgs:
    """The per-tensor scalars of the native kernel as two small device tensors (built once per step)."""

    def __init__(self, hyper: LeanHyper, step_sizes: Tensor, bc2_sqrts: Tensor, decay: float | Tensor,
                 mult: Tensor | None, keep: Tensor | None, keys: list[Tensor], param_keys: list[Tensor] | None) -> None:
        n = step_sizes.shape[0]
        consts = torch.tensor([1.0 - hyper.beta1, hyper.beta2, 1.0 - hyper.beta2, hyper.eps], dtype=torch.float32)
        per = [torch.as_tensor(x, dtype=torch.float32).reshape(()).expand(n)
               for x in (decay, 1.0 if mult is None else mult, 1.0 if keep is None else keep.to(torch.float32))]
        self.hyper = torch.cat([consts.expand(n, 4), step_sizes[:, None], bc2_sqrts[:, None],
                                torch.stack(per, dim=1)], dim=1).contiguous()
        stacked = torch.stack(keys)
        self.keys = torch.stack([stacked, torch.stack(param_keys) if param_keys else torch.zeros_like(stacked)],
                                dim=1).contiguous()


def _update_slice(s: _Slice, kind: str, hyper: LeanHyper, step_size: Tensor, bc2_sqrt: Tensor,
                  decay: float | Tensor, mult: Tensor | None, keep: Tensor | None, moment_key: Tensor | None,
                  param_key: Tensor | None) -> None:
    m, v = _load_moments(s, kind)
    g = s.g.float() if mult is None else s.g.float() * mult
    if hyper.maximize:
        g = -g
    m.lerp_(g, 1.0 - hyper.beta1)
    v.mul_(hyper.beta2).addcmul_(g, g, value=1.0 - hyper.beta2)
    root = v.sqrt()
    denom = (root / bc2_sqrt).add_(hyper.eps)
    update = (m / denom).mul_(step_size)
    new_p = (s.p.float() * decay).sub_(update)
    noise = None if param_key is None else codec.hash_noise(s.first, new_p.numel(), param_key,
                                                             new_p.device).view(new_p.shape)
    _write(s.p, _store_param(s.p, new_p, noise), keep)
    _store_moments(s, kind, m, v, root, keep, moment_key)
