"""Which update path runs: Triton kernels on CUDA, torch's fused/foreach kernels elsewhere.

``backend="auto"`` picks Triton for CUDA tensors when Triton imports, torch otherwise. The environment
variable ``LIGHTNING_OPTKIT_BACKEND`` (``auto``, ``torch`` or ``triton``) overrides ``"auto"``; an explicit
``backend=`` argument wins over it. The Triton path on CPU tensors runs only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how CPU-only CI checks the kernels.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from functools import lru_cache

import torch

from lightning_optkit.errors import SpecError

BACKEND_ENV = "LIGHTNING_OPTKIT_BACKEND"
BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

log = logging.getLogger("lightning_optkit.kernels")


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_backend(backend: str, field: str = "backend") -> str:
    """Validate a ``backend=`` argument; return it lower-cased."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise SpecError(field, backend, f"use one of {', '.join(repr(b) for b in BACKENDS)}",
                        problem="is not a kernel backend")
    backend = backend.lower()
    if backend == "triton" and not triton_importable():
        raise SpecError(field, backend, "install triton (pip install 'lightning_optkit[triton]') or use "
                        "backend='torch'", problem="needs the triton package, which is not installed")
    return backend


def requested_backend(backend: str) -> str:
    """The backend asked for: the argument, or ``LIGHTNING_OPTKIT_BACKEND`` when the argument is ``auto``."""
    if backend != "auto":
        return backend
    env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={env!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
    if env == "triton" and not triton_importable():
        raise ValueError(f"{BACKEND_ENV}=triton but triton is not installed; install it (pip install "
                         f"'lightning_optkit[triton]') or unset {BACKEND_ENV}")
    return env


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def select_backend(backend: str, device: torch.device, dtype: torch.dtype,
                   contiguous: Callable[[], bool] | bool = True) -> str:
    """Resolve ``backend`` for one (device, dtype) group of tensors to ``"triton"`` or ``"torch"``.

    ``"triton"`` is used when asked for (or by ``auto`` on CUDA) and the group suits the kernels
    (fp32/bf16/fp16, contiguous, a device Triton runs on); otherwise torch's kernels run.
    ``contiguous`` may be a callable, evaluated only when Triton is a candidate.
    """
    wanted = requested_backend(backend)
    if wanted == "torch" or (wanted == "auto" and device.type != "cuda"):
        return "torch"
    suitable = dtype in TRITON_DTYPES and triton_importable()
    suitable = suitable and (contiguous() if callable(contiguous) else contiguous)
    if wanted == "auto":
        return "triton" if suitable else "torch"
    if not triton_runs_on(device):
        raise ValueError(
            f"backend 'triton' cannot run on {device.type} tensors: use CUDA tensors, set TRITON_INTERPRET=1 to "
            "run the kernels in Triton's CPU interpreter, or use backend='torch'"
        )
    return "triton" if suitable else "torch"


class PathLogger:
    """Logs one debug line per (who, device, dtype, path) the first time that path runs."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._seen: set[tuple[str, str, str]] = set()

    def __call__(self, device: torch.device, dtype: torch.dtype, path: str) -> None:
        key = (str(device), str(dtype), path)
        if key not in self._seen:
            self._seen.add(key)
            log.debug("%s: %s path for %s tensors on %s", self.who, path, dtype, device)
