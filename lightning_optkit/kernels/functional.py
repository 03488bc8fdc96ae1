"""Functional multi-tensor update steps: group tensors by (device, dtype) and run one kernel per group.

Every step takes ``grad_scale`` (a 0-d tensor multiplying every gradient, e.g. a clip coefficient) and
``skip`` (a 0-d tensor, any nonzero value means leave every tensor and counter untouched) as device tensors,
so nothing here syncs with the host. On the torch backend a ``grad_scale`` is also written back into
the fp32 gradients (torch's fused kernels do that, as ``clip_grad_norm_`` would); the Triton kernels
leave gradients as they are. ``backend`` is ``"auto"``, ``"torch"`` or ``"triton"``; see
:mod:`lightning_optkit.kernels.dispatch`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from lightning_optkit.kernels import torch_fused
from lightning_optkit.kernels.dispatch import PathLogger, select_backend

_log_path = PathLogger("lightning_optkit.kernels")

Lists = Sequence[Sequence[torch.Tensor]]


def _groups(lists: Lists) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the tensors of ``lists[0]`` grouped by (device, dtype), in order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(lists[0]):
        groups[(p.device, p.dtype)].append(i)
    return groups


def _check_lengths(lists: Lists, names: Sequence[str]) -> None:
    n = len(lists[0])
    for tensors, name in zip(lists, names):
        if len(tensors) != n:
            raise ValueError(f"{name} has {len(tensors)} tensors but params has {n}; pass one per parameter")


def _truth(skip: torch.Tensor | None) -> torch.Tensor | None:
    """``skip`` as a 0-d bool tensor on its device: any nonzero value (2, 0.5, NaN) skips, on every backend."""
    return None if skip is None else skip.detach().reshape(()).ne(0)


def _all_contiguous(lists: Lists) -> bool:
    return all(t.is_contiguous() for tensors in lists for t in tensors)


def _run(
    lists: Lists, backend: str, who: str,
    torch_fn: Callable[..., None], triton_fn: Callable[[], Callable[..., None]],
    path_log: PathLogger | None = None,
) -> None:
    groups = _groups(lists)
    for (device, dtype), idx in groups.items():
        sub = [list(tensors) for tensors in lists] if len(groups) == 1 else [[t[i] for i in idx] for t in lists]
        path = select_backend(backend, device, dtype, lambda sub=sub: _all_contiguous(sub))
        (path_log or _log_path)(device, dtype, f"{who}/{path}")
        fn = triton_fn() if path == "triton" else torch_fn
        fn(*sub)


def adamw_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
    *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool = False, maximize: bool = False, grad_scale: torch.Tensor | None = None,
    skip: torch.Tensor | None = None, backend: str = "auto", path_log: PathLogger | None = None,
    sr_seed: torch.Tensor | None = None,
) -> None:
    """One AdamW step (torch.optim.AdamW semantics) over all tensors, in place.

    ``steps`` are per-parameter 0-d float32 tensors on the parameters' device; they are advanced by one
    unless ``skip``. Moments may be fp32 (as FusedAdamW keeps them for bf16/fp16 params) or the param
    dtype; the math is fp32 either way.
    ``max_exp_avg_sqs`` is used only when ``amsgrad`` (pass ``[]`` otherwise). ``path_log`` receives
    the path chosen per group (default: one debug line per process and path). ``sr_seed`` (a 0-d
    integer device tensor; change it every step) writes bf16 parameters with stochastic rounding;
    that needs the Triton path for bf16 groups (ValueError otherwise).
    """
    if not params:
        return
    skip = _truth(skip)
    lists: list[Sequence[torch.Tensor]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "steps"]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
        names.append("max_exp_avg_sqs")
    _check_lengths(lists, names)

    def call(p, g, m, v, s, vmax=(), *, path_fn, **extra):
        path_fn(p, g, m, v, vmax, s, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, skip=skip, **extra)

    def torch_path(*sub):
        if sr_seed is not None and sub[0][0].dtype == torch.bfloat16:
            raise ValueError("stochastic rounding of bf16 params needs the Triton backend (CUDA tensors "
                             "with triton installed); turn stochastic rounding off for this run")
        call(*sub, path_fn=torch_fused.torch_adamw)

    def triton_path():
        from lightning_optkit.kernels.triton.adamw import triton_adamw

        return lambda *sub: call(*sub, path_fn=triton_adamw, sr_seed=sr_seed)

    _run(lists, backend, "adamw", torch_path, triton_path, path_log)


def sgd_momentum_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, momentum: float, weight_decay: float = 0.0, nesterov: bool = False,
    maximize: bool = False, grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One SGD step with momentum (torch.optim.SGD semantics, dampening 0), in place.

    ``bufs`` are the momentum buffers, created as zeros (equal to torch's first-step copy of the
    gradient when dampening is 0); fp32 for bf16/fp16 params. With ``momentum=0`` pass ``bufs=[]``.
    """
    if not params:
        return
    skip = _truth(skip)
    lists: list[Sequence[torch.Tensor]] = [params, grads] + ([bufs] if momentum != 0.0 else [])
    _check_lengths(lists, ["params", "grads", "bufs"])
    if nesterov and momentum <= 0.0:
        raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum}; set momentum or nesterov=False")
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
              grad_scale=grad_scale, skip=skip)

    def torch_path(p, g, b=()):
        torch_fused.torch_sgd(p, g, b, **kw)

    def triton_path():
        from lightning_optkit.kernels.triton.sgd import triton_sgd

        return lambda p, g, b=(): triton_sgd(p, g, b, **kw)

    _run(lists, backend, "sgd", torch_path, triton_path)


def lion_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0,
    maximize: bool = False, grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One Lion step, in place: ``p *= 1 - lr*wd; p -= lr*sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g``.

    ``exp_avgs`` start as zeros; fp32 for bf16/fp16 params.
    """
    if not params:
        return
    _check_lengths([params, grads, exp_avgs], ["params", "grads", "exp_avgs"])
    skip = _truth(skip)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
              grad_scale=grad_scale, skip=skip)

    def torch_path(p, g, m):
        torch_fused.torch_lion(p, g, m, **kw)

    def triton_path():
        from lightning_optkit.kernels.triton.lion import triton_lion

        return lambda p, g, m: triton_lion(p, g, m, **kw)

    _run([params, grads, exp_avgs], backend, "lion", torch_path, triton_path)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor | None:
    """Sum of squares of all ``grads`` as a 0-d float64 tensor, one launch per (device, dtype) group; None if
    empty.

    float64 gradients are summed in float64; float32/bf16/fp16 ones with float32 arithmetic per tensor (the
    Triton kernel: per chunk, scaled by the chunk's largest magnitude, so it cannot overflow), combined in
    float64. The result lives on the first gradient's device. Inf/NaN entries propagate (as inf or NaN).
    """
    if not grads:
        return None
    device0 = grads[0].device
    total: torch.Tensor | None = None
    for (device, dtype), idx in _groups([grads]).items():
        sub = [grads[i] for i in idx]
        path = select_backend(backend, device, dtype, lambda sub=sub: all(g.is_contiguous() for g in sub))
        if path == "triton":
            from lightning_optkit.kernels.triton.norm import sum_of_squares

            part = sum_of_squares(sub)
        else:
            part = torch_fused.torch_sum_of_squares(sub)
        part = part.to(device0, non_blocking=True)
        total = part if total is None else total + part
    return total


def grad_norm(grads: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor | None:
    """The global 2-norm of ``grads`` (:func:`grad_sum_of_squares`, square-rooted): float64 when any
    gradient is float64, else float32 (finite whenever the norm is, also when the squares overflow
    float32, except on the torch backend for one tensor whose own squared norm does; see
    :func:`lightning_optkit.kernels.torch_fused.torch_sum_of_squares`). None if empty."""
    total = grad_sum_of_squares(grads, backend)
    if total is None:
        return None
    norm = total.sqrt()
    return norm if any(g.dtype == torch.float64 for g in grads) else norm.float()
