"""scripts/setup_env.sh: says what it does, installs everything on a fresh machine, skips pip when current.

The script runs for real (bash, its own files copied to a temporary repository) against a Python that
records its pip calls instead of downloading: ``PYTHON`` points to a stand-in for the machine's
Python whose ``-m venv .venv`` makes a ``.venv/bin/python`` that runs this interpreter for everything
but ``-m pip``, which it appends to a log (and fails when ``FAKE_PIP_RC`` says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

VENV_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip ${*:3}" >>"$FAKE_PIP_LOG"
  exit "${FAKE_PIP_RC:-0}"
fi
exec %(real)s "$@"
"""

SYSTEM_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  cp "%(template)s" "$3/bin/python"
  chmod +x "$3/bin/python"
  exit 0
fi
exec %(real)s "$@"
"""


class Repo:
    """A copy of the files setup_env.sh reads, a fake machine Python, and the pip log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "scripts").mkdir(parents=True)
        for name in ("constraints.txt", "pyproject.toml", "scripts/setup_env.sh"):
            shutil.copy(ROOT / name, root / name)
        template = root / "venv_python"
        template.write_text(VENV_PYTHON % {"real": sys.executable})
        self.python = root / "machine_python"
        self.python.write_text(SYSTEM_PYTHON % {"real": sys.executable, "template": template})
        self.python.chmod(0o755)
        self.log = root / "pip.log"

    def setup(self, extras: str = "", **env: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        inherited = {k: v for k, v in os.environ.items() if k != "OPTKIT_SETUP_FORCE"}
        run_env = {**inherited, "PYTHON": str(self.python), "FAKE_PIP_LOG": str(self.log), **env}
        return subprocess.run(["bash", "scripts/setup_env.sh", *([extras] if extras else [])], cwd=self.root,
                              env=run_env, capture_output=True, text=True, timeout=60)

    def pip_calls(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "repo")


def test_a_fresh_machine_gets_a_venv_and_every_install_with_progress(repo) -> None:
    run = repo.setup("dev,triton")
    assert run.returncode == 0, run.stderr
    assert (repo.root / ".venv" / "bin" / "python").exists()
    calls = repo.pip_calls()
    assert len(calls) == 3
    assert calls[0] == "pip install -q --upgrade pip"
    assert "-c constraints.txt torch" in calls[1]
    assert calls[2].endswith("-c constraints.txt -e .[dev,triton]")
    progress = [line for line in run.stderr.splitlines() if line.startswith("setup: ")]
    assert progress[0].startswith("setup: creating .venv with Python 3.")
    assert any("installing torch==" in line for line in progress)
    assert any("installing lightning_optkit[dev,triton]" in line for line in progress)
    assert progress[-1].startswith("setup: done in ")


def test_a_current_venv_runs_no_pip_and_a_change_reinstalls(repo) -> None:
    assert repo.setup("dev,triton").returncode == 0
    for extras in ("dev,triton", "triton,dev", "dev", ""):  # installed already (any order, a subset, none)
        run = repo.setup(extras)
        assert run.returncode == 0 and repo.pip_calls() == [], (extras, repo.pip_calls())
        assert "setup: .venv is current (extras: dev,triton); nothing to install" in run.stderr
    run = repo.setup("examples")  # a new extra: installed together with the ones there
    assert repo.pip_calls()[-1].endswith("-e .[dev,examples,triton]")
    assert repo.setup("examples").returncode == 0 and repo.pip_calls() == []
    with open(repo.root / "constraints.txt", "a") as f:  # a new pin: everything again, with the new versions
        f.write("numpy==2.0.0\n")
    assert repo.setup().returncode == 0 and repo.pip_calls()[-1].endswith("-e .[dev,examples,triton]")
    assert repo.setup().returncode == 0 and repo.pip_calls() == []
    (repo.root / "pyproject.toml").write_text((repo.root / "pyproject.toml").read_text() + "\n# edited\n")
    assert repo.setup().returncode == 0 and len(repo.pip_calls()) == 3
    assert repo.setup(OPTKIT_SETUP_FORCE="1").returncode == 0 and len(repo.pip_calls()) == 3


def test_a_failed_install_is_retried_by_the_next_setup(repo) -> None:
    assert repo.setup("dev").returncode == 0
    with open(repo.root / "constraints.txt", "a") as f:
        f.write("numpy==2.0.0\n")
    failed = repo.setup("dev", FAKE_PIP_RC="1")
    assert failed.returncode != 0
    assert not (repo.root / ".venv" / ".optkit-setup-stamp").exists()
    again = repo.setup("dev")
    assert again.returncode == 0 and len(repo.pip_calls()) == 3
    assert repo.setup("dev").returncode == 0 and repo.pip_calls() == []
