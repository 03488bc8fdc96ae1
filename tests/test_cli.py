"""The `optkit` command: the demo (the main job) and the plan table, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_optkit.cli import main


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_optkit.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
def test_demo_trains_and_writes_an_offline_wandb_run(tmp_path) -> None:
    result = run_cli("demo", "--epochs", "2", "--save-dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backbone" in result.stdout and "head" in result.stdout  # the plan table
    assert "final: val_acc=" in result.stdout
    assert "W&B run (offline) written to" in result.stdout
    runs = list((tmp_path / "demo" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_plan_command_prints_the_assignment(tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "optimizer: adamw\nlr: 1e-3\nweight_decay: 0.05\n"
        "groups:\n  - {params: 'head.*', name: head, lr: 1e-2}\n"
    )
    assert main(["plan", "lightning_optkit.demo:SpiralClassifier", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "head.weight" in out and "backbone.0.weight" in out
    head_row = next(line for line in out.splitlines() if line.startswith("head.weight"))
    assert head_row.split()[1:5] == ["AdamW", "head", "0.01", "0.05"]


def test_plan_command_reports_spec_errors_with_exit_code_2(tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("optimizer: sgd\nlr: 0.01\nlr_decay: 0.001\n")
    assert main(["plan", "lightning_optkit.demo:SpiralClassifier", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "lr_decay" in err and "inverse_time" in err
