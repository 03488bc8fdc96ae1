"""Hide the modules in ``OPTKIT_TEST_HIDDEN_MODULES`` and the distributions in ``OPTKIT_TEST_HIDDEN_DISTS``.

Put on ``PYTHONPATH`` by ``tests/readme_env.py``, so a subprocess (and the processes it starts, e.g. a
DDP rank) sees only what an environment installed the README's way holds: importing a hidden module
raises ModuleNotFoundError and ``importlib.metadata`` does not find a hidden distribution, as if they
were not installed (libraries that check versions through metadata, as Lightning does for
jsonargparse, then take their not-installed path).
"""

import os
import re
import sys

_HIDDEN = frozenset(filter(None, os.environ.get("OPTKIT_TEST_HIDDEN_MODULES", "").split(",")))
_HIDDEN_DISTS = frozenset(filter(None, os.environ.get("OPTKIT_TEST_HIDDEN_DISTS", "").split(",")))


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name or "").lower()


def _hide_modules():
    """Make the path finder (where installed packages are found) not find the hidden top-level modules.

    Not found, rather than an error: ``importlib.util.find_spec`` then returns None as for a missing
    package (torch probes optional modules that way), and ``import`` raises ModuleNotFoundError.
    """
    from importlib.machinery import PathFinder

    original = PathFinder.find_spec

    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            return None
        return original(name, path, target)

    PathFinder.find_spec = find_spec


def _hide_distributions():
    from importlib.machinery import PathFinder

    original = PathFinder.find_distributions

    def find_distributions(*args, **kwargs):
        found = original(*args, **kwargs)
        return (d for d in found if _canonical(d.metadata["Name"]) not in _HIDDEN_DISTS)

    PathFinder.find_distributions = find_distributions


if _HIDDEN:
    for _name in list(sys.modules):  # nothing hidden may be imported already (site hooks import little)
        if _name.partition(".")[0] in _HIDDEN:
            del sys.modules[_name]
    _hide_modules()
if _HIDDEN_DISTS:
    _hide_distributions()
