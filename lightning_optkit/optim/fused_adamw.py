"""FusedAdamW: AdamW with global-norm clipping and non-finite skipping inside one fused step.

Follows ``torch.optim.AdamW`` step for step and reads/writes its ``state_dict`` format. The update runs
as one kernel launch per (device, dtype) group: hand-written Triton kernels on CUDA, torch's own fused
kernel (``torch._fused_adamw_``) on CPU and wherever Triton is missing (see
:mod:`lightning_optkit.kernels.dispatch`).

No step syncs with the host: the clip coefficient, the skip flag (non-finite gradients, a deferred
NonFiniteGuard flag or GradScaler's ``found_inf``) and the step counters stay on the device.

``_step_supports_amp_scaling = True``: GradScaler (16-mixed) hands its scale and ``found_inf`` to this
optimizer instead of unscaling with a host sync (``.item()``) first; the step divides the gradients by
the scale, clips on the unscaled norm and skips on ``found_inf``, all inside the update. The cost is
Lightning's rule that such optimizers refuse ``Trainer(gradient_clip_val=...)`` (in 2.6.6 also under
bf16-mixed): use ``max_grad_norm=`` here, or the kit's GradientClipping callback, which hands its
coefficient over through :meth:`defer_grad_scale` instead of clipping itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit import validation
from lightning_optkit.errors import SpecError
from lightning_optkit.kernels.dispatch import (
    PathLogger,
    check_backend,
    requested_backend,
    select_backend,
    triton_runs_on,
)
from lightning_optkit.kernels.functional import adamw_step, clip_coefficient, grad_norm
from lightning_optkit.norms import combine_norms, tensor_norms
from lightning_optkit.optim.modifiers import StepModifiers
from lightning_optkit.registry import register_optimizer
from lightning_optkit.sharding import any_sharded, local_tensors

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# Keys torch.optim.AdamW keeps in each param group; FusedAdamW keeps the same so that either optimizer
# loads the other's state_dict. foreach/capturable/differentiable/fused are carried for that format only.
_TORCH_ONLY_KEYS = {"foreach": None, "capturable": False, "differentiable": False, "fused": None,
                    "decoupled_weight_decay": True}
# Constructor options that apply to the whole optimizer (one clip over all groups, one backend choice, one
# rounding mode); kept out of ``defaults`` so that a param group cannot appear to set them.
_OPTIMIZER_WIDE = ("max_grad_norm", "backend", "stochastic_rounding")


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def _check_number(field: str, value: Any, low: float, high: float = math.inf, *, open_high: bool = False,
                  tensor_ok: bool = False) -> None:
    if isinstance(value, Tensor) and tensor_ok:
        if value.numel() != 1:
            raise SpecError(field, value, "pass a float or a one-element tensor", problem="is not a scalar")
        return
    validation.number(field, value, at_least=low, below_one=open_high and high == 1.0, strings=False,
                      at_most=None if open_high or math.isinf(high) else high)


#: How to train a complex parameter instead (FusedAdamW refuses them at construction).
COMPLEX_FIX = ("train it with torch.optim.AdamW ('adamw', which steps complex parameters as real views), e.g. a "
               "ChainSpec member or a second optimizer with params= naming it, or register "
               "torch.view_as_real(p) as the parameter")

# Attributes set by FusedAdamW.__init__ that a deepcopy or pickle must carry (see __getstate__).
_PICKLED_ATTRIBUTES = ("max_grad_norm", "backend", "stochastic_rounding", "skipped_steps", "last_grad_norm",
                       "_sr_seed_host", "_sr_seeds")


@register_optimizer("fused_adamw")
class FusedAdamW(StepModifiers, torch.optim.Optimizer):
    """AdamW (torch semantics) with in-step global-norm clipping and sync-free non-finite skipping.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``. ``lr`` may be a
            tensor (keep it on the parameters' device for CUDA-graph capture).
        max_grad_norm: clip the global 2-norm of all gradients to this value inside the step
            (``clip_grad_norm_``'s coefficient); ``None`` disables clipping.
        backend: ``"auto"`` (Triton on CUDA when installed, else torch), ``"triton"`` or ``"torch"``.
            ``LIGHTNING_OPTKIT_BACKEND`` overrides ``"auto"``.
        stochastic_rounding: write bf16 parameters with stochastic rounding (unbiased, so updates
            smaller than half a bf16 ulp are not lost). Needs the Triton path for the bf16 params;
            other dtypes are written as usual.

    ``last_grad_norm`` holds the pre-clip global gradient norm of the last step as a device tensor
    (``None`` when the step did not compute it: no ``max_grad_norm`` and the skip decision came from
    outside). Moments are fp32 for bf16/fp16 parameters. A skipped step (non-finite gradients,
    :meth:`defer_skip`, GradScaler's ``found_inf``) leaves parameters, state and step counters untouched.

    Skipping happens even with no NonFiniteGuard (the step computes the gradient norm to decide), so
    it is counted: ``skipped_steps`` is a 0-d int64 tensor on the parameters' device, incremented inside
    every step by its skip flag (no host sync). Read it when you log, e.g.
    ``self.log("skipped", optimizer.skipped_steps.item())``; it counts since construction and is not
    part of ``state_dict``. A ``copy.deepcopy`` or pickle keeps it and every constructor setting.

    ``max_grad_norm``, ``backend`` and ``stochastic_rounding`` apply to the whole optimizer: a param
    group that sets one of them raises a SpecError. A complex parameter is refused at construction
    (SpecError): give it to ``torch.optim.AdamW``, which steps it as a real view.
    """

    _step_supports_amp_scaling = True
    #: Read by build_optimizers, which names a complex parameter of the model before constructing this.
    supports_complex = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        stochastic_rounding: bool = False,
    ) -> None:
        _check_number("lr", lr, 0.0, tensor_ok=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise SpecError("betas", betas, "pass two numbers (beta1, beta2), e.g. (0.9, 0.999)",
                            problem="is not a pair")
        _check_number("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        _check_number("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        _check_number("eps", eps, 0.0)
        _check_number("weight_decay", weight_decay, 0.0)
        if max_grad_norm is not None:
            validation.number("max_grad_norm", max_grad_norm, positive=True, strings=False,
                              fix="use a positive number, or None to disable in-step clipping")
        self.backend = check_backend(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, **_TORCH_ONLY_KEYS)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self._path_log = PathLogger(type(self).__name__)
        self.stochastic_rounding = bool(stochastic_rounding)
        self._sr_seeds: dict[torch.device, Tensor] = {}
        if self.stochastic_rounding:
            self._check_stochastic_rounding_path()
            # Drawn from torch's RNG (so seeded runs repeat), and only when asked for, so that turning
            # the feature off leaves the user's random stream exactly as torch.optim.AdamW would.
            self._sr_seed_host = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        if self.backend == "triton":
            for group in self.param_groups:
                for p in group["params"]:
                    if not triton_runs_on(p.device):
                        raise SpecError("backend", backend, "move the model to CUDA, set TRITON_INTERPRET=1 "
                                        "(Triton's CPU interpreter, for tests), or use backend='torch'",
                                        problem=f"cannot run on {p.device.type} parameters")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, refusing options that apply to the whole optimizer only."""
        for key in _OPTIMIZER_WIDE:
            if key in param_group:
                raise SpecError(f"param group {key}", param_group[key], f"set {key} once on FusedAdamW(...) "
                                "(it applies to every group), and drop it from the param group",
                                problem="is an optimizer-wide option that a param group cannot change")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if torch.is_complex(p):
                self.param_groups.pop()
                raise SpecError("params", f"param group {len(self.param_groups)}, parameter {i}: {p.dtype}, shape "
                                f"{tuple(p.shape)}", COMPLEX_FIX, problem="is a complex parameter, which FusedAdamW "
                                "cannot train")

    def _advance_sr_seeds(self) -> None:
        """Move every stochastic-rounding seed on by one, on device: fresh noise for the next step."""
        for seed in self._sr_seeds.values():
            seed.add_(1)

    def _check_stochastic_rounding_path(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    continue
                try:
                    path = select_backend(self.backend, p.device, p.dtype, lambda p=p: p.is_contiguous())
                except ValueError:
                    path = "torch"
                if path != "triton":
                    raise SpecError("stochastic_rounding", True, "train on CUDA with triton installed "
                                    "(backend='auto' or 'triton'), or set stochastic_rounding=False",
                                    problem=f"needs the Triton path, but bf16 params on {p.device} take the "
                                    "torch path")

    def _sr_seed(self, device: torch.device) -> Tensor | None:
        """The per-device stochastic-rounding seed: a device counter advanced by every step."""
        if not self.stochastic_rounding:
            return None
        seed = self._sr_seeds.get(device)
        if seed is None:
            seed = self._sr_seeds[device] = self._sr_seed_host.to(device)
        return seed

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, param_groups) plus the optimizer-wide settings and counters.

        torch's ``Optimizer.__getstate__`` keeps only the former, so without this a deepcopy or an
        unpickled FusedAdamW lost ``max_grad_norm``, ``backend`` and ``skipped_steps`` and could not step.
        """
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _PICKLED_ATTRIBUTES if key in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extra = {key: state.pop(key) for key in _PICKLED_ATTRIBUTES if key in state}
        super().__setstate__(state)
        self.max_grad_norm = extra.get("max_grad_norm")
        self.backend = extra.get("backend", "auto")
        self.stochastic_rounding = extra.get("stochastic_rounding", False)
        self.skipped_steps = extra.get("skipped_steps", torch.zeros((), dtype=torch.int64))
        self.last_grad_norm = extra.get("last_grad_norm")
        self._sr_seeds = extra.get("_sr_seeds", {})
        if "_sr_seed_host" in extra:
            self._sr_seed_host = extra["_sr_seed_host"]
        self._path_log = PathLogger(type(self).__name__)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            for key, value in _TORCH_ONLY_KEYS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a FusedAdamW or ``torch.optim.AdamW`` state_dict (any of torch's AdamW variants).

        Afterwards step counters are 0-d float32 tensors on the parameter's device and moments of
        bf16/fp16 parameters are fp32, whatever the checkpoint had.
        """
        for group in state_dict.get("param_groups", []):
            if group.get("decoupled_weight_decay", True) is False and group.get("weight_decay", 0):
                raise ValueError("this state_dict comes from torch.optim.Adam (L2 weight decay, "
                                 "decoupled_weight_decay=False); FusedAdamW is AdamW: load it into "
                                 "torch.optim.Adam, or set weight_decay=0 in the checkpoint")
        # torch's loader casts every state tensor to its parameter's dtype, which would round the fp32
        # moments of bf16/fp16 parameters; keep the checkpoint's tensors to restore them afterwards.
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        own_params = [p for group in self.param_groups for p in group["params"]]
        id_to_param = dict(zip(saved_ids, own_params))
        moments = {
            i: {k: v for k, v in st.items() if k in _MOMENT_KEYS and isinstance(v, Tensor)}
            for i, st in state_dict.get("state", {}).items()
        }
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
        for i, saved in moments.items():
            p = id_to_param.get(i)
            if p is None:
                continue
            state = self.state[p]
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
            for key, value in saved.items():
                state[key] = value.to(device=p.device, dtype=_state_dtype(p), copy=True)

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p),
                                                       memory_format=torch.preserve_format)
        return state

    def _gather(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        batches = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients; use torch.optim.SparseAdam")
                self._init_state(p, group["amsgrad"])
                params.append(p)
                grads.append(p.grad)
            if params:
                batches.append((group, params, grads))
        return batches

    def _scale_and_skip(self, grads: list[Tensor], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """The gradient multiplier and skip flag for this step, from every source, on ``device``."""
        deferred_scale, deferred_skip = self.pop_step_modifiers()
        amp_scale: Tensor | None = getattr(self, "grad_scale", None)  # set by GradScaler.step
        amp_found_inf: Tensor | None = getattr(self, "found_inf", None)
        # A float64 run's norm, coefficient and multiplier stay float64 (the kernels take what they need).
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        mult = None if deferred_scale is None else deferred_scale.to(device, dtype)
        if amp_scale is not None:
            inv = torch.reciprocal(amp_scale.to(device, torch.float64)).to(dtype).reshape(())
            mult = inv if mult is None else mult * inv
        flags = [f.to(device).reshape(()) != 0 for f in (deferred_skip, amp_found_inf) if f is not None]
        self.last_grad_norm = None
        if self.max_grad_norm is not None or not flags:
            # Either we clip, or nobody has checked the gradients for inf/nan yet. The norm is taken in the
            # gradients' precision and cannot overflow float32 (see grad_norm), so a finite gradient is
            # never taken for a non-finite one.
            if any_sharded(grads):  # FSDP2: the whole gradients' norm, one all-reduce, the same on every rank
                norm = combine_norms(tensor_norms(grads, 2.0), 2.0, device)
            else:
                norm = grad_norm(grads, requested_backend(self.backend)).to(device)
            if mult is not None:
                norm = norm * mult
            self.last_grad_norm = norm
            flags.append(~torch.isfinite(norm))
            if self.max_grad_norm is not None:
                coef = clip_coefficient(norm, self.max_grad_norm)
                mult = coef if mult is None else mult * coef
        skip = flags[0]
        for flag in flags[1:]:
            skip = skip | flag
        return mult, skip.to(torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step over every parameter with a gradient; runs ``closure`` first if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self._gather()
        if not batches:
            self.pop_step_modifiers()
            return loss
        all_grads = [g for _, _, grads in batches for g in grads]
        device = all_grads[0].device
        mult, skip = self._scale_and_skip(all_grads, device)
        if self.skipped_steps.device != device:
            self.skipped_steps = self.skipped_steps.to(device)
        self.skipped_steps.add_(skip.to(torch.int64))
        for group, params, grads in batches:
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            # under FSDP2 the update is element-wise on each rank's shards (state is sharded like p)
            adamw_step(
                list(local_tensors(params)), list(local_tensors(grads)),
                list(local_tensors([s["exp_avg"] for s in states])),
                list(local_tensors([s["exp_avg_sq"] for s in states])),
                list(local_tensors([s["max_exp_avg_sq"] for s in states])) if group["amsgrad"] else [],
                [s["step"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=mult, skip=skip,
                backend=self.backend, path_log=self._path_log, sr_seed=self._sr_seed(params[0].device),
            )
        self._advance_sr_seeds()
        return loss
