"""Preview a schedule without training: every group's lr per step, a PNG plot and a text summary.

``optkit schedule spec.yaml --steps N [--steps-per-epoch K] [--plot lr.png]`` (wired by
:func:`register_cli`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
) -> PreviewSummary:
    """The lr of each group (``name -> base lr``) over a fit of ``steps`` optimizer steps; plots if asked."""
    if steps <= 0:
        raise ValueError(f"steps={steps} must be a positive number of optimizer steps")
    curve = schedule.curve(steps, steps_per_epoch)
    multipliers = [curve(t) for t in range(steps)]
    lrs = {name: [base * m for m in multipliers] for name, base in group_lrs.items()}
    peak_step = max(range(steps), key=lambda t: (multipliers[t], -t))
    summary = PreviewSummary(
        lrs=lrs,
        multipliers=multipliers,
        steps=steps,
        warmup_end=curve.warmup_end_step(),
        peak={name: (peak_step, values[peak_step]) for name, values in lrs.items()},
        end={name: values[-1] for name, values in lrs.items()},
    )
    if plot_path is not None:
        figure = plot(summary, schedule)
        figure.savefig(plot_path, dpi=100)
        import matplotlib.pyplot as plt

        plt.close(figure)
    return summary


def plot(summary: PreviewSummary, schedule: Schedule) -> Any:
    """A matplotlib Figure (Agg): every group's lr (log-scaled when they differ > 20x) above the shared
    multiplier, the warmup end marked on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lr_axes, mult_axes) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    steps = range(summary.steps)
    for name, lrs in summary.lrs.items():
        lr_axes.plot(steps, lrs, label=name)
    peaks = [peak for _, peak in summary.peak.values() if peak > 0]
    if peaks and max(peaks) > 20 * min(peaks):
        lr_axes.set_yscale("symlog", linthresh=min(peaks) / 100)
    mult_axes.plot(steps, summary.multipliers, color="black")
    for axes in (lr_axes, mult_axes):
        if summary.warmup_end:
            axes.axvline(
                summary.warmup_end, color="grey", linestyle="--", label=f"warmup end (step {summary.warmup_end})"
            )
        axes.grid(alpha=0.3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_title(f"{schedule!r}", fontsize=9)
    lr_axes.legend()
    mult_axes.set_ylabel("multiplier (lr / base)")
    mult_axes.set_xlabel("optimizer step")
    figure.tight_layout()
    return figure


def spec_group_lrs(spec: Any) -> dict[str, float]:
    """``{group name: lr}`` for an OptimizerSpec: the spec's lr for ungrouped params, then each group's."""
    lrs = {"default": float(spec.lr)}
    for index, group in enumerate(spec.groups):
        name = group.name or f"group{index}"
        if group.lr is not None:
            lrs[name] = float(group.lr)
        else:
            lrs[name] = float(spec.lr) * (group.lr_scale if group.lr_scale is not None else 1.0)
    return lrs


def _preview_targets(path: str) -> list[tuple[str, Schedule, dict[str, float]]]:
    """``(label, schedule, group lrs)`` for every spec in the YAML that has a kit schedule."""
    from lightning_optkit.spec import OptimizerSpec

    loaded = OptimizerSpec.from_yaml(path)
    targets = []
    for item in loaded if isinstance(loaded, list) else [loaded]:
        if not isinstance(getattr(item, "schedule", None), Schedule):
            continue
        if hasattr(item, "specs"):  # a ChainSpec: one schedule over every member's groups
            lrs = {f"{s.label}/{k}": v for s in item.specs for k, v in spec_group_lrs(s).items()}
        else:
            lrs = spec_group_lrs(item)
        targets.append((item.label, item.schedule, lrs))
    return targets


def run_schedule_command(args: argparse.Namespace) -> int:
    """The ``optkit schedule`` handler: print the summary, write the plot; returns the exit code."""
    targets = _preview_targets(args.spec)
    if not targets:
        print(f"{args.spec}: no kit schedule to preview (add e.g. 'schedule: {{name: cosine, warmup: 5%}}')")
        return 1
    for index, (label, schedule, lrs) in enumerate(targets):
        plot_path = args.plot
        if plot_path is not None and len(targets) > 1:
            plot_path = Path(plot_path).with_stem(f"{Path(plot_path).stem}_{index}")
        summary = preview(schedule, lrs, args.steps, plot_path, steps_per_epoch=args.steps_per_epoch)
        print(f"{label}: {schedule!r}")
        print(summary.text())
        if plot_path is not None:
            print(f"plot written to {plot_path}")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``schedule`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("schedule", help="preview a spec's learning-rate schedule (text and PNG)")
    parser.add_argument("spec", help="OptimizerSpec YAML file")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps in the fit")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="for durations in epochs ('2ep')")
    parser.add_argument("--plot", default=None, help="write a PNG of every group's lr here")
    parser.set_defaults(func=run_schedule_command)
    return parser
