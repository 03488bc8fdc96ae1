"""The torch path: torch's own fused kernels (AdamW, SGD) and per-tensor ops (Lion).

Used on CPU and wherever Triton is missing. Clipping needs no extra pass: the clip coefficient goes in
as ``grad_scale`` (a *divisor* for torch's fused kernels, so its reciprocal is passed) and the skip flag
as ``found_inf`` (the kernels then leave every element untouched; the step counters are advanced before
and the flag subtracted after, as torch.optim's own wrapper does). Note that torch's fused kernels write
the scaled gradient back into ``.grad`` when ``grad_scale`` is given, as ``clip_grad_norm_`` would.

``torch._fused_adamw_``, ``torch._fused_sgd_`` and the ``torch._foreach_*`` ops are private torch ops
(there is no public multi-tensor API); they are used only in this module, with the signatures of
torch 2.13 (``torch/_C/_VariableFunctions.pyi``) as called by ``torch/optim/adam.py`` and ``sgd.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _fp32_working_copies(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """fp32 copies of low-precision params/grads (torch's fused kernels want one dtype for all lists)."""
    if params[0].dtype in LOW_PRECISION:
        return [p.float() for p in params], [g.float() for g in grads], True
    return list(params), list(grads), False


def _divisor(grad_scale: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if grad_scale is None:
        return None
    return torch.reciprocal(grad_scale.to(device=device, dtype=torch.float32, non_blocking=True))


def _found_inf(skip: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if skip is None:
        return None
    return skip.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)


def torch_adamw(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
    *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """``torch._fused_adamw_`` over one (device, dtype) group; low-precision params run in fp32 copies."""
    device = params[0].device
    work_p, work_g, copied = _fp32_working_copies(params, grads)
    found_inf = _found_inf(skip, device)
    steps = list(steps)
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(
        work_p, work_g, list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs) if amsgrad else [], steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
        maximize=maximize, grad_scale=_divisor(grad_scale, device), found_inf=found_inf,
    )
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    if copied:
        torch._foreach_copy_(list(params), work_p)


def torch_sgd(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, momentum: float, weight_decay: float, nesterov: bool, maximize: bool,
    grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """``torch._fused_sgd_`` (dampening 0) over one group. Zero-initialised buffers equal torch's first step."""
    device = params[0].device
    work_p, work_g, copied = _fp32_working_copies(params, grads)
    torch._fused_sgd_(
        work_p, work_g, list(bufs) if momentum != 0.0 else [],
        weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=0.0, nesterov=nesterov,
        maximize=maximize, is_first_step=False,
        grad_scale=_divisor(grad_scale, device), found_inf=_found_inf(skip, device),
    )
    if copied:
        torch._foreach_copy_(list(params), work_p)


def torch_lion(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """Lion with per-tensor ops in fp32 (torch has no fused Lion). Skipping selects old values with where."""
    device = params[0].device
    mult = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
    keep = None if skip is None else skip.to(device=device).reshape(()).to(torch.bool)
    decay = 1.0 - lr * weight_decay
    for p, g, m in zip(params, grads, exp_avgs):
        p32, g32, m32 = p.float(), g.float(), m.float()
        if mult is not None:
            g32 = g32 * mult
        if maximize:
            g32 = -g32
        direction = torch.sign(m32 * beta1 + g32 * (1.0 - beta1))
        new_p = p32 * decay - lr * direction
        new_m = m32 * beta2 + g32 * (1.0 - beta2)
        if keep is not None:
            new_p = torch.where(keep, p32, new_p)
            new_m = torch.where(keep, m32, new_m)
        p.copy_(new_p)
        m.copy_(new_m)


def torch_sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of ``grads`` (fp32 accumulation), as a 0-d device tensor."""
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()
