"""Optional dependencies: which extra of ``lightning_optkit`` installs which module, and the one-line error
when a feature needs a module that is not installed.

The extras (``pyproject.toml``): ``plot`` (matplotlib: ``optkit schedule --plot``, ``examples/05``),
``cli`` (jsonargparse: LightningCLI, ``examples/09``), ``triton`` (the Triton kernels), ``examples``
(``plot`` + ``cli``: what the README's demo command installs), ``dev`` (the test suite) and ``bench`` (the peer
libraries of benchmarks/bench_peers.py and tests/test_optim_peers.py, listed in ``EXTRAS``, and torchao, whose
AdamW8bit is the peer of ``benchmarks/bench_lean_quality.py --torchao``, which imports it itself).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "require", "require_in_script"]

#: extra name -> the modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "plot": ("matplotlib",),
    "cli": ("jsonargparse",),
    "triton": ("triton",),
    "bench": ("pytorch_optimizer", "schedulefree", "lion_pytorch", "adan_pytorch"),
}


class MissingExtra(ModuleNotFoundError):
    """A feature needs a module of an optional extra that is not installed; the message says which extra."""

    def __init__(self, extra: str, module: str, feature: str) -> None:
        self.extra = extra
        super().__init__(
            f"{feature} needs {module}, which is not installed. Fix: pip install 'lightning_optkit[{extra}]' "
            f"(in a clone of the repository: bash scripts/setup_env.sh {extra})", name=module)


def install_hint(extra: str) -> str:
    """How to install ``extra``, for messages."""
    return f"pip install 'lightning_optkit[{extra}]'"


def require(extra: str, feature: str, module: str | None = None) -> ModuleType:
    """Import ``module`` (default: the extra's first module) for ``feature``, or raise :class:`MissingExtra`."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    name = module or EXTRAS[extra][0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and name.split(".")[0] == err.name.split(".")[0]:
            raise MissingExtra(extra, err.name.split(".")[0], feature) from None
        raise


def require_in_script(extra: str, feature: str, module: str | None = None) -> ModuleType:
    """:func:`require` for a script: a missing extra ends it with the one-line message (exit status 1)."""
    try:
        return require(extra, feature, module)
    except MissingExtra as err:
        raise SystemExit(str(err)) from None
