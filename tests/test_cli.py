"""The `optkit` command: the demo (the main job) and the plan table, run as a user runs them."""

from __future__ import annotations

import re
import shlex
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
    result = run_cli("demo", "--epochs", "2", "--save-dir", "demo", cwd=tmp_path)  # relative, as the default is
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backbone" in result.stdout and "head" in result.stdout  # the plan table
    assert "final: val_acc=" in result.stdout
    runs = list((tmp_path / "demo" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    # the printed path and command work from any folder: absolute, with this environment's wandb
    written = re.search(r"W&B run \(offline\) written to (\S+)\n", result.stdout)
    assert written and Path(written.group(1)).is_absolute(), result.stdout
    assert Path(written.group(1)) == runs[0].parent.resolve()
    command = re.search(r"upload it later with: (.+)\n", result.stdout).group(1)
    assert shlex.split(command) == [str(Path(sys.executable).parent / "wandb"), "sync", written.group(1)]
    assert Path(shlex.split(command)[0]).exists()


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


MODELS_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
'''


def optkit_script() -> Path:
    """The ``optkit`` console script the install put next to this interpreter (what a user runs)."""
    script = Path(sys.executable).parent / "optkit"
    assert script.exists(), f"no optkit console script next to {sys.executable}: install the package (setup_env.sh)"
    return script


def test_the_console_script_plans_a_model_from_the_current_folder(tmp_path) -> None:
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    (tmp_path / "spec.yaml").write_text("optimizer: adamw\nlr: 1e-3\ngroups:\n  - {params: 'head.*', name: head}\n")
    run = subprocess.run([str(optkit_script()), "plan", "mymodels:Net", "spec.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    head_row = next(line for line in run.stdout.splitlines() if line.startswith("head.weight"))
    assert head_row.split()[1:3] == ["AdamW", "head"]


@pytest.mark.parametrize(("target", "expected"), [
    ("mymodel:Net", ["names the module 'mymodel', which is neither in the current folder", "mymodel.py",
                     "PYTHONPATH"]),
    ("mymodels:Nett", ["does not define", "did you mean 'Net'?"]),
    ("broken:Net", ["install 'not_a_real_dependency'", "the module 'broken' imports it"]),
    ("mymodels.Net", ["is not of the form module:ClassName", "mymodels:Net"]),
])
def test_a_model_that_cannot_be_loaded_gets_the_fix_that_applies(tmp_path, capsys, monkeypatch, target, expected):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    (tmp_path / "broken.py").write_text("import not_a_real_dependency\n")
    (tmp_path / "spec.yaml").write_text("optimizer: adamw\nlr: 1e-3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("mymodels", "broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["plan", target, "spec.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for text in expected:
        assert text in err, err
