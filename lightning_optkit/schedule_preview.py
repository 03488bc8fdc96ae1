"""Preview a schedule without training: every group's lr per step, a PNG plot and a text summary.

``optkit schedule spec.yaml --steps N [--steps-per-epoch K] [--plot lr.png] [--yscale log]
[--model module:Class]`` (wired by :func:`register_cli`). The plot needs the ``plot`` extra (matplotlib);
without it the summary is still printed, then a one-line error names the extra.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_optkit.errors import SpecError
from lightning_optkit.extras import require
from lightning_optkit.schedules import Schedule


@dataclass
class PreviewSummary:
    """The lrs of every group at every step, and their peak, end and warmup end."""

    lrs: dict[str, list[float]]
    multipliers: list[float]
    steps: int
    warmup_end: int
    peak: dict[str, tuple[int, float]] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        """A short human-readable summary, one line per group."""
        lines = [f"{self.steps} steps, warmup ends at step {self.warmup_end}"]
        for name, lrs in self.lrs.items():
            step, peak = self.peak[name]
            lines.append(f"  {name}: start {lrs[0]:.4g}, peak {peak:.4g} at step {step}, end {self.end[name]:.4g}")
        return "\n".join(lines)


def preview(
    schedule: Schedule,
    group_lrs: dict[str, float],
    steps: int,
    plot_path: str | Path | None = None,
    *,
    steps_per_epoch: int | None = None,
    title: str | None = None,
    yscale: str = "auto",
) -> PreviewSummary:
    """The lr of each group (``name -> base lr``) over a fit of ``steps`` optimizer steps; plots if asked."""
    summary = summarize(schedule, group_lrs, steps, steps_per_epoch=steps_per_epoch)
    if plot_path is not None:
        save_plot(summary, schedule, plot_path, title=title, yscale=yscale)
    return summary


def summarize(schedule: Schedule, group_lrs: dict[str, float], steps: int, *,
              steps_per_epoch: int | None = None) -> PreviewSummary:
    """The lr of each group (``name -> base lr``) at every step of a fit of ``steps`` optimizer steps."""
    if steps <= 0:
        raise ValueError(f"steps={steps} must be a positive number of optimizer steps")
    curve = schedule.curve(steps, steps_per_epoch)
    multipliers = [curve(t) for t in range(steps)]
    lrs = {name: [base * m for m in multipliers] for name, base in group_lrs.items()}
    peak_step = max(range(steps), key=lambda t: (multipliers[t], -t))
    return PreviewSummary(
        lrs=lrs,
        multipliers=multipliers,
        steps=steps,
        warmup_end=curve.warmup_end_step(),
        peak={name: (peak_step, values[peak_step]) for name, values in lrs.items()},
        end={name: values[-1] for name, values in lrs.items()},
    )


def save_plot(summary: PreviewSummary, schedule: Schedule, path: str | Path, *, title: str | None = None,
              yscale: str = "auto") -> None:
    """Write :func:`plot`'s figure as a PNG (needs the ``plot`` extra: matplotlib)."""
    figure = plot(summary, schedule, title=title, yscale=yscale)
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)


#: auto y scale: logarithmic when the groups' peak lrs differ by this factor or more
LOG_SCALE_SPREAD = 10.0
YSCALES = ("auto", "linear", "log")


def plot(summary: PreviewSummary, schedule: Schedule, *, title: str | None = None, yscale: str = "auto") -> Any:
    """A matplotlib Figure (Agg): every group's lr above the shared multiplier, the warmup end marked on both.

    ``title`` (e.g. the optimizer's name) goes before the schedule in the title. ``yscale``: ``"log"``
    (symmetric log, so a warmup from 0 still shows), ``"linear"``, or ``"auto"``: log when the groups'
    peaks differ by :data:`LOG_SCALE_SPREAD` or more (a head with ``lr_scale=10`` stays readable).
    """
    if yscale not in YSCALES:
        raise ValueError(f"yscale={yscale!r} must be one of {YSCALES}")
    matplotlib = require("plot", "plotting a schedule")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lr_axes, mult_axes) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    steps = range(summary.steps)
    for name, lrs in summary.lrs.items():
        lr_axes.plot(steps, lrs, label=name)
    peaks = [peak for _, peak in summary.peak.values() if peak > 0]
    spread = max(peaks) / min(peaks) if peaks else 1.0
    if peaks and (yscale == "log" or (yscale == "auto" and spread >= LOG_SCALE_SPREAD)):
        lr_axes.set_yscale("symlog", linthresh=min(peaks) / 100)
    mult_axes.plot(steps, summary.multipliers, color="black")
    for axes in (lr_axes, mult_axes):
        if summary.warmup_end:
            axes.axvline(
                summary.warmup_end, color="grey", linestyle="--", label=f"warmup end (step {summary.warmup_end})"
            )
        axes.grid(alpha=0.3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_title(f"{title}: {schedule!r}" if title else f"{schedule!r}", fontsize=9)
    lr_axes.legend()
    mult_axes.set_ylabel("multiplier (lr / base)")
    mult_axes.set_xlabel("optimizer step")
    figure.tight_layout()
    return figure


def spec_group_lrs(spec: Any) -> dict[str, float]:
    """``{group name: lr}`` for an OptimizerSpec: the spec's lr for ungrouped params, then each group's.

    Without a model there are no parameters, so ``layer_decay`` (a factor per depth) is not applied:
    :func:`model_group_lrs` gives every torch group's lr, layer decay included.
    """
    lrs = {"default": float(spec.lr)}
    for index, group in enumerate(spec.groups):
        name = group.name or f"group{index}"
        if group.lr is not None:
            lrs[name] = float(group.lr)
        else:
            lrs[name] = float(spec.lr) * (group.lr_scale if group.lr_scale is not None else 1.0)
    return lrs


def model_group_lrs(model: Any, loaded: Any) -> list[dict[str, float]]:
    """``{torch group name: lr}`` per schedule target of ``loaded``, from the plan on ``model``: the groups
    the optimizers will really have (no-decay splits, layer decay), in the order of :func:`_preview_targets`."""
    from lightning_optkit.params import plan

    optimizers = plan(model, loaded).optimizers
    if isinstance(loaded, list):  # several optimizers: one plan entry each
        return [{g.name: float(g.lr) for g in op.groups} for op in optimizers]
    if hasattr(loaded, "specs"):  # a ChainSpec: one schedule over every member's groups
        return [{f"{op.label}/{g.name}": float(g.lr) for op in optimizers for g in op.groups}]
    return [{g.name: float(g.lr) for g in optimizers[0].groups}]


def _preview_targets(path: str, model: Any = None) -> list[tuple[str, Schedule, dict[str, float], bool]]:
    """``(label, schedule, group lrs, layer decay left out)`` for every spec in the YAML with a kit schedule."""
    from lightning_optkit.spec import OptimizerSpec

    loaded = OptimizerSpec.from_yaml(path)
    items = loaded if isinstance(loaded, list) else [loaded]
    planned = model_group_lrs(model, loaded) if model is not None else None
    targets = []
    for index, item in enumerate(items):
        if not isinstance(getattr(item, "schedule", None), Schedule):
            continue
        members = item.specs if hasattr(item, "specs") else [item]
        if planned is not None:
            lrs = planned[index]
        elif hasattr(item, "specs"):  # a ChainSpec: one schedule over every member's groups
            lrs = {f"{s.label}/{k}": v for s in item.specs for k, v in spec_group_lrs(s).items()}
        else:
            lrs = spec_group_lrs(item)
        decay_left_out = planned is None and any(getattr(s, "layer_decay", None) for s in members)
        targets.append((item.label, item.schedule, lrs, decay_left_out))
    return targets


def _plot_path(path: str, label: str, several: bool) -> Path:
    """``lr.png``; with several schedules ``lr_<label>.png`` (``lr_gen.png``, ``lr_disc.png``)."""
    plot_path = Path(path)
    if not several:
        return plot_path
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return plot_path.with_stem(f"{plot_path.stem}_{safe}")


def run_schedule_command(args: argparse.Namespace) -> int:
    """The ``optkit schedule`` handler: print the summary, write the plot; returns the exit code."""
    model = None
    if getattr(args, "model", None):
        from lightning_optkit.cli import load_model

        model = load_model(args.model)
    targets = _preview_targets(args.spec, model)
    if not targets:
        print(f"{args.spec}: no kit schedule to preview (add e.g. 'schedule: {{name: cosine, warmup: 5%}}')")
        return 1
    several = len(targets) > 1
    for label, schedule, lrs, decay_left_out in targets:
        try:
            summary = summarize(schedule, lrs, args.steps, steps_per_epoch=args.steps_per_epoch)
        except SpecError as err:
            if args.steps_per_epoch is None and "steps per epoch" in (err.problem or ""):
                raise SpecError(err.field, err.value, "pass --steps-per-epoch N (the optimizer steps in one epoch "
                                "of your fit), or give the duration in steps", problem=err.problem) from err
            raise
        print(f"{label}: {schedule!r}")
        print(summary.text())
        if decay_left_out:
            print("  note: layer_decay is not applied without a model; pass --model module:Class to see every "
                  "layer's lr")
        if args.plot is not None:
            plot_path = _plot_path(args.plot, label, several)
            save_plot(summary, schedule, plot_path, title=label, yscale=args.yscale)
            print(f"plot written to {plot_path}")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``schedule`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("schedule", help="preview a spec's learning-rate schedule (text and PNG)")
    parser.add_argument("spec", help="OptimizerSpec YAML file")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps in the fit")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="for durations in epochs ('2ep')")
    parser.add_argument("--plot", default=None, help="write a PNG of every group's lr here (needs the plot extra); "
                        "with several optimizers one file each, lr_<name>.png")
    parser.add_argument("--yscale", choices=YSCALES, default="auto",
                        help=f"lr axis of the plot; auto: log when groups' peaks differ {LOG_SCALE_SPREAD:g}x or more")
    parser.add_argument("--model", default=None, help="module:ModelClass (constructs without arguments): preview "
                        "the groups the model really gets, layer_decay and no-decay splits included")
    parser.set_defaults(func=run_schedule_command)
    return parser
