"""Schedule previews: the summary, the PNG plot and the ``optkit schedule`` subcommand."""

from __future__ import annotations

import argparse

import matplotlib
import pytest

from lightning_optkit.schedule_preview import plot, preview, register_cli
from lightning_optkit.schedules import Schedule

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_summary_reports_peak_end_and_warmup() -> None:
    schedule = Schedule("cosine", warmup=20, min_lr_ratio=0.1)
    summary = preview(schedule, {"head": 1e-2, "body": 1e-4}, steps=200)
    assert summary.warmup_end == 20
    assert summary.peak == {"head": (20, 1e-2), "body": (20, 1e-4)}
    assert summary.end["head"] == pytest.approx(1e-2 * schedule.multipliers(200)[-1])
    assert summary.lrs["body"][10] == pytest.approx(1e-4 * 0.5)
    text = summary.text()
    assert "warmup ends at step 20" in text and "head: start 0, peak 0.01 at step 20" in text


def test_plot_has_labelled_axes_one_line_per_group_and_marked_warmup(tmp_path) -> None:
    schedule = Schedule("wsd", warmup="10%", decay="30%")
    summary = preview(schedule, {"a": 0.1, "b": 0.003, "c": 0.02}, steps=100)
    figure = plot(summary, schedule)
    lr_axes, mult_axes = figure.axes
    assert lr_axes.get_ylabel() == "learning rate" and mult_axes.get_xlabel() == "optimizer step"
    assert mult_axes.get_ylabel().startswith("multiplier")
    labels = [line.get_label() for line in lr_axes.get_lines()]
    assert labels == ["a", "b", "c", "warmup end (step 10)"]
    assert lr_axes.get_yscale() == "symlog"  # 33x spread between groups
    assert list(lr_axes.get_lines()[1].get_ydata()) == pytest.approx(summary.lrs["b"])


def test_plot_file_is_a_real_png(tmp_path) -> None:
    path = tmp_path / "lr.png"
    preview(Schedule("onecycle"), {"default": 1e-3}, steps=50, plot_path=path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_schedule_subcommand_reads_a_spec_yaml(tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "optimizer: adamw\nlr: 1e-3\ngroups:\n  - {params: 'head.*', name: head, lr_scale: 10}\n"
        "  - {params: 'backbone.*', name: backbone, lr: 1e-5}\n"
        "schedule: {name: cosine, warmup: 5%, min_lr_ratio: 0.1}\n"
    )
    parser = argparse.ArgumentParser(prog="optkit")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["schedule", str(spec), "--steps", "200", "--plot", str(tmp_path / "lr.png")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "warmup ends at step 10" in out
    assert "head: start 0, peak 0.01 at step 10" in out and "backbone: start 0, peak 1e-05" in out
    assert (tmp_path / "lr.png").read_bytes().startswith(PNG_MAGIC)


def test_schedule_subcommand_without_a_schedule_fails(tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("optimizer: sgd\nlr: 0.1\n")
    parser = argparse.ArgumentParser(prog="optkit")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["schedule", str(spec), "--steps", "10"])
    assert args.func(args) == 1
    assert "no kit schedule" in capsys.readouterr().out
