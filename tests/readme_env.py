"""An environment "installed the way the README says", for subprocesses of the tests.

``scripts/demo.sh`` (the README's main command) installs ``lightning_optkit[<extras>]``. The test venv
holds more (the ``dev`` extra: pytest, hypothesis, ...). :func:`readme_env` gives a subprocess
environment in which every installed distribution outside the dependency closure of
``lightning_optkit[<demo.sh's extras>]`` (read from ``pyproject.toml`` and the installed metadata) is
hidden from imports, so an example that needs a module the README's install lacks fails as it would
for a user.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "readme_env_site"
# what `python -m venv` itself puts in a fresh environment
VENV_BASE = {"pip", "setuptools", "wheel"}


def demo_extras() -> list[str]:
    """The extras ``scripts/demo.sh`` passes to ``scripts/setup_env.sh``."""
    match = re.search(r"^bash scripts/setup_env\.sh(.*)$", (ROOT / "scripts" / "demo.sh").read_text(), re.MULTILINE)
    assert match, "scripts/demo.sh does not call scripts/setup_env.sh"
    words = match.group(1).split()
    return [e for e in words[0].split(",") if e] if words else []


def _project_requirements(extras: list[str]) -> list[Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        optional = project.get("optional-dependencies", {})
        unknown = sorted(set(extras) - set(optional))
        assert not unknown, f"scripts/demo.sh installs extras {unknown} that pyproject.toml does not define"
        lines = list(project["dependencies"]) + [r for e in extras for r in optional[e]]
        return [Requirement(line) for line in lines]
    return _requires(canonicalize_name("lightning_optkit"), frozenset(extras))  # Python 3.10: the installed metadata


def _requires(dist_name: str, extras: frozenset[str]) -> list[Requirement]:
    """The requirements of an installed distribution that apply with ``extras``."""
    out = []
    for line in md.distribution(dist_name).requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            out.append(req)
    return out


@functools.cache
def closure(extras: tuple[str, ...]) -> frozenset[str]:
    """Canonical names of the distributions ``pip install lightning_optkit[extras]`` brings in (installed ones)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in _project_requirements(list(extras))]
    while todo:
        name, req_extras = todo.pop()
        if (name, req_extras) in seen:
            continue
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-specific dependency)
        seen.add((name, req_extras))
        todo += [(canonicalize_name(r.name), frozenset(r.extras)) for r in _requires(name, req_extras)]
    return frozenset({name for name, _ in seen} | {canonicalize_name("lightning_optkit")})


@functools.cache
def hidden(extras: tuple[str, ...], also: tuple[str, ...] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(top-level modules, distribution names) installed here outside :func:`closure`, plus the modules
    ``also`` and the distributions that provide them."""
    keep = closure(extras) | VENV_BASE
    modules, dists = set(also), set()
    for module, providers in md.packages_distributions().items():
        names = {canonicalize_name(d) for d in providers}
        if module in also:
            dists |= names
        if module.startswith("_") and module != "_pytest":
            continue  # private helper modules (e.g. _distutils_hack, _cffi_backend) stay
        if not names & keep:
            modules.add(module)
            dists |= names
    return tuple(sorted(modules)), tuple(sorted(dists))


def readme_env(env: dict[str, str] | None = None, *, also_hide: tuple[str, ...] = ()) -> dict[str, str]:
    """``env`` (default ``os.environ``) for a subprocess that sees only the README install's modules
    (minus the modules ``also_hide``, to play an environment that lacks an extra)."""
    env = dict(os.environ if env is None else env)
    modules, dists = hidden(tuple(demo_extras()), tuple(also_hide))
    env["OPTKIT_TEST_HIDDEN_MODULES"] = ",".join(modules)
    env["OPTKIT_TEST_HIDDEN_DISTS"] = ",".join(dists)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), *filter(None, [env.get("PYTHONPATH")])])
    return env
