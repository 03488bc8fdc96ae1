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
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_optkit import validation
from lightning_optkit.errors import SpecError
from lightning_optkit.kernels.dispatch import (
    PathLogger,
    check_backend,
    requested_backend,
    select_backend,
    triton_runs_on,
)
from lightning_optkit.kernels.functional import adamw_step, grad_norm
from lightning_optkit.kernels.lean_adamw import LeanHyper, lean_adamw, state_kind
from lightning_optkit.norms import clip_coefficient, combine_norms, tensor_norms
from lightning_optkit.optim import lean_state
from lightning_optkit.optim.core import Batch, StepOptimizer
from lightning_optkit.registry import register_optimizer
from lightning_optkit.sharding import any_sharded, local_tensors

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", *lean_state.SCALE_KEYS)
# Keys torch.optim.AdamW keeps in each param group; FusedAdamW keeps the same so that either optimizer
# loads the other's state_dict. foreach/capturable/differentiable/fused are carried for that format only.
_TORCH_ONLY_KEYS = {"foreach": None, "capturable": False, "differentiable": False, "fused": None,
                    "decoupled_weight_decay": True}
# Constructor options that apply to the whole optimizer (one clip over all groups, one backend choice, one
# rounding mode); kept out of ``defaults`` so that a param group cannot appear to set them.
_LAYOUT_KEYS = ("state_dtype", "lean_min_numel")  # per-group settings kept out of state_dict (see state_dict)
_OPTIMIZER_WIDE = ("max_grad_norm", "backend", "stochastic_rounding", "rounding_seed")


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

# Settings an unpickled FusedAdamW without them starts from (see __setstate__).
_SETTING_DEFAULTS = {"max_grad_norm": None, "backend": "auto", "stochastic_rounding": False, "last_grad_norm": None,
                     "rounding_seed": 0}


@register_optimizer("fused_adamw")
class FusedAdamW(StepOptimizer):
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
            smaller than half a bf16 ulp are not lost). bf16 params on the Triton path use its kernel;
            on the torch path (CPU) they take the lean-state path, whose noise is seeded by
            ``rounding_seed``. Other dtypes are written as usual.
        state_dtype: how the moments are stored (per param group too): ``"float32"`` (default),
            ``"bfloat16"`` (stochastic rounding, seeded) or ``"int8"`` (blockwise codes, one fp32
            scale per 256 elements of a row, about 2.03 bytes per parameter for both moments). Math is
            fp32 either way. Only parameters with >= 2 dims and >= ``lean_min_numel`` elements (the
            global shape under FSDP2) get it; see :mod:`lightning_optkit.optim.lean_state`.
        lean_min_numel: the element count from which ``state_dtype`` applies (per group too).
        rounding_seed: the seed of the stochastic-rounding noise of the lean path: the noise is a hash
            of (seed, step count, parameter index, element), so equal seeds give bit-identical runs
            and a resumed run continues with the noise the uninterrupted one would have used.

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
    # Set by __init__; a deepcopy or pickle carries them (torch's __getstate__ alone would not).
    pickled_attributes = ("max_grad_norm", "backend", "stochastic_rounding", "skipped_steps", "last_grad_norm",
                          "_sr_seed_host", "_sr_seeds", "rounding_seed")

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
        state_dtype: str = "float32",
        lean_min_numel: int = lean_state.DEFAULT_MIN_NUMEL,
        rounding_seed: int = 0,
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
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise SpecError("rounding_seed", rounding_seed, "give an integer seed", problem="is not an integer")
        self.rounding_seed = rounding_seed
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, state_dtype=lean_state.check_state_dtype("state_dtype", state_dtype),
                        lean_min_numel=lean_state.check_min_numel("lean_min_numel", lean_min_numel),
                        **_TORCH_ONLY_KEYS)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self._path_log = PathLogger(type(self).__name__)
        self.stochastic_rounding = bool(stochastic_rounding)
        self._sr_seeds: dict[torch.device, Tensor] = {}
        if self.stochastic_rounding:
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

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Refuse complex parameters and amsgrad with lean state; normalise ``state_dtype``/``lean_min_numel``."""
        for i, p in enumerate(group["params"]):
            if torch.is_complex(p):
                raise SpecError("params", f"param group {len(self.param_groups) - 1}, parameter {i}: {p.dtype}, "
                                f"shape {tuple(p.shape)}", COMPLEX_FIX, problem="is a complex parameter, which "
                                "FusedAdamW cannot train")
        group["state_dtype"] = lean_state.check_state_dtype("param group state_dtype", group["state_dtype"])
        group["lean_min_numel"] = lean_state.check_min_numel("param group lean_min_numel", group["lean_min_numel"])
        if group["amsgrad"] and group["state_dtype"] != "float32":
            raise SpecError("amsgrad", True, "use amsgrad=False with lean state, or state_dtype='float32' for "
                            "this group", problem=f"is not supported with state_dtype={group['state_dtype']!r}")

    def finish_step(self) -> None:
        """Move every stochastic-rounding seed on by one, on device: fresh noise for the next step.

        Every group of a step uses the same seed; a caller of :meth:`update_group` outside :meth:`step`
        (the DDP overlap hook) calls this once per step.
        """
        for seed in self._sr_seeds.values():
            seed.add_(1)

    def _sr_seed(self, device: torch.device) -> Tensor | None:
        """The per-device stochastic-rounding seed: a device counter advanced by every step."""
        if not self.stochastic_rounding:
            return None
        seed = self._sr_seeds.get(device)
        if seed is None:
            seed = self._sr_seeds[device] = self._sr_seed_host.to(device)
        return seed

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The base's (settings the call does not carry keep their current values); an unpickled optimizer
        without them starts from the defaults, and old param groups get the keys added since."""
        super().__setstate__(state)
        for key, default in _SETTING_DEFAULTS.items():
            self.__dict__.setdefault(key, default)
        self.__dict__.setdefault("skipped_steps", torch.zeros((), dtype=torch.int64))
        self.__dict__.setdefault("_sr_seeds", {})
        self._path_log = PathLogger(type(self).__name__)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("state_dtype", "float32")
            group.setdefault("lean_min_numel", lean_state.DEFAULT_MIN_NUMEL)
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
        # moments of bf16/fp16 parameters and turn int8 codes into floats; keep the checkpoint's tensors
        # to restore them afterwards, in the layout each parameter's group asks for.
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        own = [(p, group) for group in self.param_groups for p in group["params"]]
        id_to_param = dict(zip(saved_ids, own))
        moments = {
            i: {k: v for k, v in st.items() if k in _MOMENT_KEYS and isinstance(v, Tensor)}
            for i, st in state_dict.get("state", {}).items()
        }
        layouts = [{key: group[key] for key in _LAYOUT_KEYS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, layout in zip(self.param_groups, layouts):
            group["decoupled_weight_decay"] = True
            group.update(layout)  # the layout is this optimizer's setting; the checkpoint holds values
        for i, saved in moments.items():
            p, group = id_to_param.get(i, (None, None))
            if p is None:
                continue
            state = self.state[p]
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
            for key in _MOMENT_KEYS:
                state.pop(key, None)
            if "exp_avg" in saved:
                state.update(lean_state.restore(p, lean_state.lean_kind(p, group), saved))
            if "max_exp_avg_sq" in saved:
                state["max_exp_avg_sq"] = saved["max_exp_avg_sq"].to(device=p.device, dtype=_state_dtype(p),
                                                                     copy=True)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with param groups in ``torch.optim.AdamW``'s keys.

        ``state_dtype`` and ``lean_min_numel`` are settings of this optimizer, not state: they are left
        out, and :meth:`load_state_dict` converts whatever layout a checkpoint holds into the one they ask
        for. Lean state tensors keep their layout (int8 codes and scales, or bf16); for torch.optim.AdamW
        convert with :func:`lightning_optkit.optim.lean_state.to_adamw_state_dict`.
        """
        out = super().state_dict()
        out["param_groups"] = [{k: v for k, v in g.items() if k not in _LAYOUT_KEYS} for g in out["param_groups"]]
        return out

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh moments for ``p`` in the layout :func:`lean_state.lean_kind` decides."""
        return lean_state.new_state(p, lean_state.lean_kind(p, group))

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """A 0-d float32 ``step`` (torch AdamW's), then the moments."""
        return {"step": torch.zeros((), dtype=torch.float32, device=p.device), **self._init_state(p, group)}

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The base's lazy state, plus ``max_exp_avg_sq`` once the group uses amsgrad."""
        state = super()._state_of(p, group)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p),
                                                       memory_format=torch.preserve_format)
        return state

    def _decide(self, batches: list[Batch]) -> tuple[Tensor | None, Tensor | None]:
        """The step's multiplier and skip flag (:meth:`_scale_and_skip`); the skip is counted in
        ``skipped_steps``."""
        if not batches:
            return self.pop_step_modifiers()
        all_grads = [g for _, _, grads in batches for g in grads]
        device = all_grads[0].device
        mult, skip = self._scale_and_skip(all_grads, device)
        if self.skipped_steps.device != device:
            self.skipped_steps = self.skipped_steps.to(device)
        self.skipped_steps.add_(skip.to(torch.int64))
        return mult, skip

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
                coef = clip_coefficient(self.max_grad_norm, norm)
                mult = coef if mult is None else mult * coef
        skip = flags[0]
        for flag in flags[1:]:
            skip = skip | flag
        return mult, skip.to(torch.float32)

    def _salt(self, p: Tensor) -> int:
        """``p``'s index among all parameters: tells tensors apart in the stochastic-rounding noise."""
        salts = self.__dict__.get("_salts")
        if salts is None or id(p) not in salts:
            salts = self.__dict__["_salts"] = {id(q): i for i, q in enumerate(
                q for g in self.param_groups for q in g["params"])}
        return salts[id(p)]

    def _takes_lean_path(self, p: Tensor, state: dict[str, Tensor]) -> bool:
        if state_kind(state) != "float32":
            return True
        if not (self.stochastic_rounding and p.dtype == torch.bfloat16):
            return False
        try:  # bf16 params rounded stochastically: the Triton kernel where it runs, else the lean path
            return select_backend(self.backend, p.device, p.dtype, lambda: p.is_contiguous()) != "triton"
        except ValueError:
            return True

    def update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], *,
                     grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
        """The AdamW update of ``params`` (all of ``group``) from ``grads``, in place, with no host sync.

        ``grad_scale`` multiplies the gradients (clip coefficient, 1/loss scale) and a nonzero ``skip``
        leaves everything untouched (both 0-d device tensors or None). The step and the DDP overlap hook
        both call this. fp32-state parameters take the fused kernels; lean ones the lean path.
        """
        states = [self._state_of(p, group) for p in params]
        lean = [self._takes_lean_path(p, st) for p, st in zip(params, states)]
        beta1, beta2 = group["betas"]
        plain = [i for i, is_lean in enumerate(lean) if not is_lean]
        if plain:
            ps, gs, sts = [params[i] for i in plain], [grads[i] for i in plain], [states[i] for i in plain]
            # under FSDP2 the update is element-wise on each rank's shards (state is sharded like p)
            adamw_step(
                list(local_tensors(ps)), list(local_tensors(gs)),
                list(local_tensors([s["exp_avg"] for s in sts])),
                list(local_tensors([s["exp_avg_sq"] for s in sts])),
                list(local_tensors([s["max_exp_avg_sq"] for s in sts])) if group["amsgrad"] else [],
                [s["step"] for s in sts],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=grad_scale, skip=skip,
                backend=self.backend, path_log=self._path_log, sr_seed=self._sr_seed(ps[0].device),
            )
        chosen = [i for i, is_lean in enumerate(lean) if is_lean]
        if chosen:
            hyper = LeanHyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], maximize=group["maximize"])
            lean_adamw(
                list(local_tensors([params[i] for i in chosen])), list(local_tensors([grads[i] for i in chosen])),
                [{k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in states[i].items()} for i in chosen],
                [self._salt(params[i]) for i in chosen], hyper, grad_scale=grad_scale, skip=skip,
                seed=self.rounding_seed, stochastic_params=self.stochastic_rounding, backend=self.backend,
                path_log=self._path_log, offsets=[lean_state.flat_offset(params[i]) for i in chosen],
            )
