"""The ``optkit`` command: ``demo``, ``plan``, ``schedule``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence

from lightning_optkit.errors import SpecError, closest
from lightning_optkit.extras import MissingExtra


def _import_from_cwd(module_name: str) -> None:
    """Put the current folder first on the import path, as ``python -m`` does (a console script gets
    its own bin folder there instead), so ``optkit plan mymodels:Net`` finds ``./mymodels.py``."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_model(target: str):
    """Construct ``module:ClassName`` (the module imported from the current folder or the installed packages)."""
    module_name, _, attr = target.partition(":")
    if not attr or not module_name:
        raise SpecError("model", target, "write it as module:ClassName, e.g. mymodels:Net for the class Net in "
                        "./mymodels.py", problem="is not of the form module:ClassName")
    _import_from_cwd(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            path = module_name.replace(".", os.sep) + ".py"
            raise SpecError("model", target, f"run optkit from the folder that holds {path}, or add that folder "
                            "to PYTHONPATH", problem=f"names the module {missing!r}, which is neither in the "
                            f"current folder ({os.getcwd()}) nor installed") from err
        raise SpecError("model", target, f"install {missing!r} in this environment (the module {module_name!r} "
                        "imports it)", problem=f"cannot be imported: {err}") from err
    except ImportError as err:
        raise SpecError("model", target, f"fix the import in {module_name!r}",
                        problem=f"cannot be imported: {err}") from err
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        classes = sorted(name for name, value in vars(module).items()
                         if inspect.isclass(value) and value.__module__ == module.__name__)
        hint = closest(attr, classes)
        fix = (f"did you mean {hint[0]!r}? " if hint else "") + f"name a class of {module_name!r}: {classes}"
        problem = f"names {attr!r}, which {module_name!r} ({getattr(module, '__file__', '?')}) " + (
            "does not define" if cls is None else "defines, but not as a class")
        raise SpecError("model", target, fix, problem=problem)
    try:
        return cls()
    except TypeError as err:
        raise SpecError("model", target, "give a class that constructs without arguments",
                        problem=f"cannot be built ({err})") from err


def _plan_command(args: argparse.Namespace) -> int:
    from lightning_optkit.params import plan
    from lightning_optkit.spec import load_yaml, spec_from_data

    model = load_model(args.model)
    print(plan(model, spec_from_data(load_yaml(args.spec))))
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from lightning_optkit.demo import run_demo

    run_demo(max_epochs=args.epochs, wandb=not args.no_wandb, save_dir=args.save_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="optkit", description="lightning_optkit command line")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small model with a spec, two groups and a schedule")
    demo.add_argument("--epochs", type=int, default=8, help="number of epochs (default 8)")
    demo.add_argument("--no-wandb", action="store_true", help="log to CSV instead of W&B (offline)")
    demo.add_argument("--save-dir", default="runs/demo", help="where logs and checkpoints go (default runs/demo)")
    demo.set_defaults(func=_demo_command)

    plan_cmd = sub.add_parser("plan", help="print which parameter goes to which optimizer and group")
    plan_cmd.add_argument("model", help="module:ModelClass, e.g. mymodels:Net for ./mymodels.py (constructs without "
                          "arguments)")
    plan_cmd.add_argument("spec", help="the spec as a YAML file")
    plan_cmd.set_defaults(func=_plan_command)

    from lightning_optkit.schedule_preview import register_cli  # matplotlib is imported only to plot

    register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optkit`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SpecError, MissingExtra) as err:
        print(f"optkit {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
