"""Every name a parameter has, and why a selector matched none of them.

A parameter can have several qualified names: a weight tied to another (an embedding shared with the output
layer), a module registered under two attributes. ``torch.compile`` adds ``_orig_mod.`` components
(``body._orig_mod.weight`` for a compiled submodule, ``_orig_mod.body.weight`` for a compiled model); they
are stripped, as torch's distributed ``get_state_dict`` strips them, so a compiled model plans exactly as the
uncompiled one. The first name (``named_parameters()`` order) is the one plans and logs show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

COMPILED_PREFIX = "_orig_mod."


def clean_name(name: str) -> str:
    """``name`` without torch.compile's ``_orig_mod.`` components."""
    return name.replace(COMPILED_PREFIX, "")


@dataclass(frozen=True)
class ParamNames:
    """The names of every parameter of a module (``aliases``, first one first) and each name's owning module."""

    aliases: dict[int, tuple[str, ...]]
    owner: dict[str, nn.Module]

    def of(self, param: nn.Parameter) -> tuple[str, ...]:
        """Every name of ``param``, the one plans show first."""
        return self.aliases[id(param)]

    def described(self, param: nn.Parameter, matched: str) -> str:
        """``matched``, saying which earlier name it is tied to when it is not the parameter's first."""
        first = self.of(param)[0]
        return matched if matched == first else f"{matched} (tied to {first})"


def param_names(module: nn.Module) -> ParamNames:
    """Every name of every parameter of ``module`` (duplicates and ``_orig_mod.`` included, then stripped)."""
    aliases: dict[int, list[str]] = {}
    owner: dict[str, nn.Module] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            name = clean_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            names = aliases.setdefault(id(p), [])
            if name not in names:
                names.append(name)
            owner.setdefault(name, mod)
    return ParamNames({k: tuple(v) for k, v in aliases.items()}, owner)


def named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``module.named_parameters()`` (each parameter once) under clean names."""
    return [(clean_name(n), p) for n, p in module.named_parameters()]


def _mentions_compiled(selector: Any) -> bool:
    if isinstance(selector, str):
        return "_orig_mod" in selector
    if isinstance(selector, (list, tuple)):
        return any(_mentions_compiled(s) for s in selector)
    if isinstance(selector, Mapping):
        return _mentions_compiled(selector.get("match"))
    return False


def _listed(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def why_no_match(selector: Any, names: ParamNames, hit: Callable[[nn.Parameter], str | None], *,
                 frozen: Iterable[nn.Parameter] = (), elsewhere: Iterable[tuple[nn.Parameter, str]] = (),
                 default: tuple[str, str]) -> tuple[str, str]:
    """``(problem, fix)`` for a selector that selected nothing where it had to select something.

    ``hit(param)`` is the name of ``param`` the selector matches (None for none); ``frozen`` are the
    parameters left out of the plan as frozen, ``elsewhere`` the parameters other optimizers take, each with
    that optimizer's label. ``default`` is the answer when none of the reasons applies.
    """
    if _mentions_compiled(selector):
        return ("names torch.compile's '_orig_mod.' prefix, which parameter names are planned without (as "
                "torch's distributed state_dict strips it), so a compiled model plans as the uncompiled one",
                "drop '_orig_mod.' from the pattern (e.g. 'body.*' for 'body._orig_mod.*')")
    frozen_hits = [names.described(p, n) for p in frozen if (n := hit(p)) is not None]
    if frozen_hits:
        return (f"matches only frozen parameters (requires_grad=False): {_listed(frozen_hits)}",
                "unfreeze them (requires_grad_(True)), set frozen='include' to plan frozen parameters too, or "
                "drop the pattern")
    others = [f"{names.described(p, n)} in optimizer {label}" for p, label in elsewhere if (n := hit(p)) is not None]
    if others:
        return (f"matches only parameters another optimizer takes: {_listed(others)}",
                "move the pattern to that optimizer's spec, or narrow that optimizer's params")
    return default
