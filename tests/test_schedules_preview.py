"""Schedule previews: the summary, the PNG plot and the ``optkit schedule`` subcommand."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------ what a user of `optkit schedule` reads
def test_epoch_durations_ask_for_steps_per_epoch_on_the_command_line(tmp_path, capsys) -> None:
    from lightning_optkit.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("optimizer: adamw\nlr: 1e-3\nschedule: {name: cosine, warmup: 2ep}\n")
    assert main(["schedule", str(spec), "--steps", "100"]) == 2
    err = capsys.readouterr().err
    assert "warmup='2ep' counts epochs" in err and "Fix: pass --steps-per-epoch N" in err
    assert main(["schedule", str(spec), "--steps", "100", "--steps-per-epoch", "10"]) == 0
    assert "warmup ends at step 20" in capsys.readouterr().out


def test_several_optimizers_get_their_own_titled_plot(tmp_path, capsys) -> None:
    from lightning_optkit.cli import main

    spec = tmp_path / "gan.yaml"
    spec.write_text("- {optimizer: adam, name: gen, lr: 2e-4, params: 'gen.*', schedule: {name: cosine, warmup: 10%}}\n"
                    "- {optimizer: adam, name: disc, lr: 1e-4, params: 'disc.*', schedule: {name: linear}}\n")
    assert main(["schedule", str(spec), "--steps", "50", "--plot", str(tmp_path / "lr.png")]) == 0
    out = capsys.readouterr().out
    for name in ("gen", "disc"):
        assert f"plot written to {tmp_path / f'lr_{name}.png'}" in out
        assert (tmp_path / f"lr_{name}.png").read_bytes().startswith(PNG_MAGIC)
    schedule = Schedule("linear")
    figure = plot(preview(schedule, {"default": 1e-4}, steps=50), schedule, title="disc")
    assert figure.axes[0].get_title() == "disc: Schedule('linear')"


@pytest.mark.parametrize(("yscale", "expected"), [("auto", "symlog"), ("log", "symlog"), ("linear", "linear")])
def test_a_head_with_lr_scale_10_is_plotted_on_a_log_axis_unless_asked_otherwise(yscale, expected) -> None:
    schedule = Schedule("cosine", warmup=5)
    summary = preview(schedule, {"default": 1e-3, "head": 1e-2}, steps=50)
    assert plot(summary, schedule, yscale=yscale).axes[0].get_yscale() == expected
    small = preview(schedule, {"default": 1e-3, "head": 2e-3}, steps=50)
    assert plot(small, schedule).axes[0].get_yscale() == "linear"  # close lrs stay linear in auto


MODELS = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 2)
'''


def test_layer_decay_is_previewed_with_a_model_and_flagged_without_one(tmp_path, capsys, monkeypatch) -> None:
    from lightning_optkit.cli import main

    (tmp_path / "decaymodels.py").write_text(MODELS)
    spec = tmp_path / "spec.yaml"
    spec.write_text("optimizer: adamw\nlr: 1e-3\nlayer_decay: {rate: 0.5, depth: 're:blocks\\.(\\d+)\\.'}\n"
                    "schedule: {name: constant}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "decaymodels", raising=False)
    assert main(["schedule", "spec.yaml", "--steps", "10"]) == 0
    assert "note: layer_decay is not applied without a model; pass --model" in capsys.readouterr().out
    assert main(["schedule", "spec.yaml", "--steps", "10", "--model", "decaymodels:Net"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out
    # depth 0 (embed), blocks 1 and 2, head at max depth 3: lr * 0.5 ** (3 - depth)
    for depth in range(4):
        assert f"default/layer{depth}: start {1e-3 * 0.5 ** (3 - depth):.4g}," in out, out


@pytest.mark.slow
def test_without_matplotlib_the_summary_prints_then_one_line_names_the_plot_extra(tmp_path) -> None:
    from readme_env import readme_env

    spec = tmp_path / "spec.yaml"
    spec.write_text("optimizer: adamw\nlr: 1e-3\nschedule: {name: cosine, warmup: 5%}\n")
    script = Path(sys.executable).parent / "optkit"
    run = subprocess.run([str(script), "schedule", "spec.yaml", "--steps", "100", "--plot", "lr.png"], cwd=tmp_path,
                         env=readme_env(also_hide=("matplotlib",)), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "100 steps, warmup ends at step 5" in run.stdout
    assert run.stderr == ("optkit schedule: plotting a schedule needs matplotlib, which is not installed. Fix: pip "
                          "install 'lightning_optkit[plot]' (in a clone of the repository: bash scripts/setup_env.sh "
                          "plot)\n")
    assert not (tmp_path / "lr.png").exists()
