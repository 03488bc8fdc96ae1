"""FSDP2 (fully_shard under Lightning's ModelParallelStrategy) with every kit feature, against DDP.

Real 2-process runs on CPU with gloo (tests/ddp_scripts/run_sharded.py): the same model, data and seed
trained 20 steps under ``strategy="ddp"`` and under FSDP2 with every layer sharded (uneven shards, one
empty), for adamw + norm clipping + guard + monitor, fused_adamw(max_grad_norm), lion + agc,
lamb + value clipping, adan + zscore, momentum_sgd + quantile + per-group clipping, schedulefree_adamw +
per-param clipping, and two optimizers in manual optimization with all three callbacks; a NaN put into one
element of rank 1's gradient shard; a run SIGKILLed and resumed from Lightning's distributed checkpoint;
and every torch call of the optimizer steps recorded.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

SCRIPT = Path(__file__).parent / "ddp_scripts" / "run_sharded.py"
sys.path.insert(0, str(SCRIPT.parent))
import run_sharded as rs  # noqa: E402

TRAINED = sorted(rs.CONFIGS)
HOST_TRANSFERS = rs.HOST_TRANSFERS


def _launch(*args: str, expect_kill: bool = False) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE",
                                                                        "MASTER_", "PL_", "RANK"))}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parents[1])
    if expect_kill:
        assert result.returncode != 0, "the run was expected to be killed"
    else:
        assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One DDP and one FSDP2 process pair for all configs; then the killed run and its resumption."""
    root = tmp_path_factory.mktemp("sharded")
    _launch("ddp", str(root / "ddp"), *TRAINED)
    _launch("fsdp", str(root / "fsdp"), "killed", expect_kill=True)
    _launch("fsdp", str(root / "fsdp"), *TRAINED, "resume", "syncs")
    return {"ddp": root / "ddp", "fsdp": root / "fsdp"}


def _ranks(path: Path) -> list[dict]:
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _metrics(path: Path) -> dict[int, dict[str, float]]:
    """Logged rows by step (rows of one step merged), from the CSV logger of rank 0."""
    rows: dict[int, dict[str, float]] = {}
    with open(path / "logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def _initial() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rs.ShardNet({}, False, False).named_parameters()}


@pytest.mark.parametrize("config", TRAINED)
def test_fsdp2_trains_like_ddp(runs, config):
    ddp, fsdp = _ranks(runs["ddp"] / config)[0], _ranks(runs["fsdp"] / config)[0]
    assert fsdp["sharded"] and not ddp["sharded"] and fsdp["global_step"] == ddp["global_step"] == rs.STEPS
    initial = _initial()
    moved = 0.0
    for name, want in ddp["params"].items():
        got = fsdp["params"][name]
        assert got.shape == want.shape
        scale = want.abs().max()
        # sums taken in another order (reduce-scatter vs all-reduce, sharded norms): 1e-5 relative
        assert (got - want).abs().max() <= 1e-5 * scale, (config, name, ((got - want).abs().max() / scale).item())
        moved = max(moved, ((want - initial[name]).abs().max() / initial[name].abs().max().clamp_min(1e-3)).item())
    assert moved > 1e-2  # the runs trained: agreement is not trivial


@pytest.mark.parametrize("config", ["adamw_norm", "adan_zscore", "manual_two"])
def test_logged_norms_equal_ddp(runs, config):
    """Grad (pre-clip), clipped grad, param and update norms, total and per layer, and the clip values."""
    ddp, fsdp = _metrics(runs["ddp"] / config), _metrics(runs["fsdp"] / config)
    assert ddp.keys() == fsdp.keys() and len(ddp) >= 4
    compared = 0
    for step, want in ddp.items():
        assert fsdp[step].keys() == want.keys(), step
        for key, value in want.items():
            got = fsdp[step][key]
            if math.isnan(value):
                assert math.isnan(got), (step, key)
                continue
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
            compared += key.startswith(("grad_norm/", "param_norm/", "update_norm/", "grad_clip/"))
    assert compared >= 40
    assert any("grad_norm/layer/blocks.0" in row for row in fsdp.values())


@pytest.mark.parametrize("config", ["adamw_norm", "fused_adamw"])
def test_nan_in_one_ranks_shard_skips_the_step_on_every_rank(runs, config):
    rank0, rank1 = _ranks(runs["fsdp"] / config)
    # the NaN was in rank 1's shard only; both ranks skipped, and neither changed a parameter at that step
    assert rank0["skipped"] == rank1["skipped"] == {0: 1.0}
    assert rank0["unchanged_at_nan_step"] is True and rank1["unchanged_at_nan_step"] is True
    # ... and training went on: finite, equal to DDP's run (which skipped the same step; see above)
    assert all(torch.isfinite(p).all() for p in rank0["params"].values())


def test_killed_run_resumes_bit_identical_from_the_distributed_checkpoint(runs):
    assert (runs["fsdp"] / "resume" / "ckpt" / "step=12.ckpt").is_dir()  # Lightning's distributed checkpoint
    resumed, uninterrupted = _ranks(runs["fsdp"] / "resume")[0], _ranks(runs["fsdp"] / "adamw_norm")[0]
    assert resumed["global_step"] == rs.STEPS
    for name, want in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], want), name
    # the guard's counters came back from the checkpoint (the NaN step was before it)
    assert resumed["skipped"] == {0: 1.0}


def test_no_host_sync_on_non_logging_steps(runs):
    """Backward, GradientClipping, NonFiniteGuard, OptimizerMonitor and FusedAdamW's step: every torch call."""
    for rank in _ranks(runs["fsdp"] / "syncs"):
        calls = rank["calls"]
        assert sorted(calls) == list(range(10))
        logging = {4, 9}  # log_every_n_steps=5
        for step, names in calls.items():
            if step not in logging:
                assert not HOST_TRANSFERS & set(names), (step, sorted(HOST_TRANSFERS & set(names)))
        assert any(HOST_TRANSFERS & set(calls[s]) for s in logging)  # the probe does see the logging transfer
