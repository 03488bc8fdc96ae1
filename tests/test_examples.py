"""Every script in examples/ runs as a user would run it, and prints what it claims to show.

Each example runs in its own process (``sys.executable``, cwd a temporary folder, W&B offline),
two at a time, started once for the whole module; each test then checks its example's exit status
and the key lines of its output. Examples run with one intra-op thread: their models are tiny, and
on a small shared machine extra threads only contend.

They run in the environment the README's main command installs (``scripts/demo.sh``: the package
with the extras it names): every distribution outside that install's dependency closure (pytest,
hypothesis, triton, ...) is hidden from their imports (``tests/readme_env.py``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from readme_env import demo_extras, hidden, readme_env

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 60  # per example (the limit)
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))


@dataclass
class Run:
    """What one example did: exit status, output, wall time."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _run(script: str, workdir: Path, also_hide: tuple[str, ...] = ()) -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    launch = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK")
    env = {**{k: v for k, v in os.environ.items() if k not in launch},  # a leaked LOCAL_RANK would hang 08
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "OMP_NUM_THREADS": "1", "OPTKIT_EXAMPLES_OUT": str(workdir / "out"), "PYTHONUNBUFFERED": "1"}
    env = readme_env(env, also_hide=also_hide)
    start = time.perf_counter()
    # A new session, so that a timeout also ends the processes an example started (08's second rank).
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script)], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[timed out after {TIMEOUT_S} s]"
    return Run(proc.returncode, stdout, stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Future]:
    """Start the selected examples (two processes at a time); each test waits for its own."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    root = tmp_path_factory.mktemp("examples")
    pool = ThreadPoolExecutor(max_workers=2)
    request.addfinalizer(lambda: pool.shutdown(wait=True))
    return {s: pool.submit(_run, s, root / s.removesuffix(".py")) for s in selected}


def output_of(runs: dict[str, Future], script: str) -> str:
    run = runs[script].result()
    assert run.returncode == 0, (f"{script} exited with {run.returncode} after {run.seconds:.1f} s\n"
                                 f"{run.stdout}\n{run.stderr[-4000:]}")
    return run.stdout


def number_after(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*([-+0-9.eE]+)", text)
    assert match, f"no {pattern!r} in:\n{text}"
    return float(match.group(1))


def check_01(out: str) -> None:
    assert "default/no_decay" in out and "body.1.weight" in out  # the plan: LayerNorm weight not decayed
    assert number_after(r"lr_decay vs inverse_time schedule: max parameter difference", out) < 1e-6
    assert "Adagrad + inverse_time" in out and "SGD + inverse_time" in out


def check_02(out: str) -> None:
    assert "SpecError: lr_decay=0.0001 is not a keyword of SGD" in out and "inverse_time" in out
    assert "overlaps optimizer 0 (SGD) on fc2.weight, fc2.bias" in out
    assert "batches trained before the error: 0" in out
    assert "corrected: trained with ChainedOptimizer" in out


def check_03(out: str) -> None:
    assert "SpecError: betas=(0.9, 0.99) is not a keyword of TutorialMomentumSGD" in out
    assert re.search(r"SpecError: momentum=1.5 .*TutorialMomentumSGD.*\[0, 1\)", out), out
    assert "tutorial_sgd (TutorialMomentumSGD)" in out
    assert number_after(r"max parameter difference from torch.optim.SGD after \d+ steps:", out) < 1e-6


def check_04(out: str) -> None:
    assert "manual optimization: True" in out and "gen=Adam, disc=Adam" in out
    match = re.search(r"\|radius - 2\| = ([0-9.]+) before training, ([0-9.]+) after", out)
    assert match, out
    assert float(match.group(2)) < 0.8 * float(match.group(1))


def check_05(out: str) -> None:
    assert "kit warmup-cosine" in out and "torch StepLR (per epoch)" in out
    path = Path(re.search(r"plot written to (\S+)", out).group(1))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_06(out: str) -> None:
    assert "cross_entropy(logits, torch.rand(8, 3))" in out
    norm_section = out[out.index("norm clipping, max_norm=0.3"):out.index("AGC")]
    logged = re.findall(r"total_norm=([0-9.]+)\s+grad_clip/clip_coef=([0-9.]+)", norm_section)
    assert len(logged) == 4, out
    for norm, coef in logged:  # the coefficient applied is min(1, max_norm / norm), printed to 3 decimals
        assert abs(float(coef) - min(1.0, 0.3 / float(norm))) < 5e-3, (norm, coef)
    assert any(float(coef) < 1.0 for _, coef in logged)
    assert "AGC, clip_factor=0.01" in out and "grad_clip/clip_coef=" in out[out.index("AGC"):]
    assert "NaN batch, no guard: parameters finite: False" in out
    assert "NaN batch, NonFiniteGuard: parameters finite: True" in out
    assert number_after(r"guard/skipped_steps=", out) == 4  # the one bad batch, in each of 4 epochs


def check_07(out: str) -> None:
    assert "unfroze the backbone at epoch 1" in out and "backbone/layer1/no_decay" in out
    ends = re.findall(r"^\s+(\S+)\s+([0-9.e+-]+) -> ([0-9.e+-]+)\s+weight_decay", out, re.MULTILINE)
    assert len(ends) == 10, out
    ratios = {round(float(end) / float(base), 6) for _, base, end in ends}
    assert len(ratios) == 1, f"the added groups were not scheduled like the head: {ratios}"


def check_08(out: str) -> None:
    assert "2 ranks, optimizer FusedAdamW" in out
    assert "ranks hold identical parameters" in out


def check_09(out: str) -> None:
    callbacks = re.search(r"trainer callbacks .*: (\[.*\])", out)
    assert callbacks and "'GradientClipping'" in callbacks.group(1) and "'NonFiniteGuard'" in callbacks.group(1), out
    assert "'head/no_decay'" in out and "'lr_scale': 5.0" in out
    assert number_after(r"val_acc=", out) > 0.5


def check_10(out: str) -> None:
    assert "W&B run (offline) written to" in out
    assert "grad_norm/total=" in out and "update_ratio/total=" in out
    assert re.search(r"val_acc read back from the run: \[[0-9., ]+\]", out)


def check_11(out: str) -> None:
    assert "2 ranks, FSDP2: parameters are DTensor (Shard(dim=0),)" in out
    assert number_after(r"NaN in rank 1's shard at step 5\): ", out) == 1
    assert 0 < number_after(r"grad_clip/clip_coef=", out) <= 1
    assert number_after(r"max relative difference from the same fit under DDP: ", out) < 1e-5


CHECKS = {name: check for name, check in globals().items() if name.startswith("check_")}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_prints_what_it_shows(script: str, runs: dict[str, Future]) -> None:
    out = output_of(runs, script)
    CHECKS[f"check_{script[:2]}"](out)


def test_every_example_has_a_check_and_a_docstring() -> None:
    assert len(SCRIPTS) == 11
    assert sorted(CHECKS) == sorted(f"check_{s[:2]}" for s in SCRIPTS)
    for script in SCRIPTS:
        assert (EXAMPLES / script).read_text().startswith('"""'), script


def test_the_examples_environment_is_the_readme_install() -> None:
    """What the examples run in: the demo's extras installed, the dev-only packages hidden (so the check bites)."""
    assert demo_extras() == ["examples"]
    modules, dists = hidden(tuple(demo_extras()))
    assert {"pytest", "hypothesis"} <= set(modules) and {"pytest", "hypothesis"} <= set(dists)
    assert not {"matplotlib", "jsonargparse", "lightning", "torch", "wandb"} & set(modules)
    probe = subprocess.run([sys.executable, "-c", "import pytest"], env=readme_env(), capture_output=True, text=True)
    assert probe.returncode == 1 and "No module named 'pytest'" in probe.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("script", "module", "extra"), [
    ("05_schedules.py", "matplotlib", "plot"),
    ("09_lightning_cli.py", "jsonargparse", "cli"),
])
def test_an_example_without_its_extra_says_in_one_line_which_to_install(tmp_path, script, module, extra) -> None:
    run = _run(script, tmp_path, also_hide=(module,))
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr == (f"examples/{script} {'(the PNG)' if extra == 'plot' else '(LightningCLI)'} needs "
                          f"{module}, which is not installed. Fix: pip install 'lightning_optkit[{extra}]' "
                          f"(in a clone of the repository: bash scripts/setup_env.sh {extra})\n")
