"""Exact resume: a DDP run SIGKILLed mid-epoch and resumed in a fresh process ends bit-identical.

What is exact (checked here): parameters, FusedAdamW state, the kit schedule, GradientClipping's
adaptive (zscore) state and NonFiniteGuard's counters are all restored from Lightning's checkpoint, on
CPU bit for bit; resuming with another number of processes gives the same run (to 1e-6, the gradient
sums run in another order) because no state is per rank. What is not exact by itself: the data
position. Lightning 2.6.6 restarts a plain DataLoader mid-epoch from the epoch's *first* batch (it only
shortens the epoch, with a PossibleUserWarning); only a loader implementing ``state_dict`` /
``load_state_dict`` (here ddp_helpers.ResumableLoader, or torchdata's StatefulDataLoader) resumes at
the right batch. Resuming at an epoch boundary is exact with any deterministic sampler.
"""

from __future__ import annotations

import os

import ddp_helpers as h
import pytest
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from lightning_optkit.callbacks import RestoreLoaderPosition

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return h.shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """A kit run SIGKILLed at step KILL_AT, then (fresh processes) resumed from its last checkpoint;
    and the overlap run resumed from its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    killed = root / "killed"
    h.launch([{"out": str(killed), "world": 2, "mode": "kit", "kill_at": h.KILL_AT}], expect_kill=True)
    h.launch([
        {"out": str(root / "kit"), "world": 2, "mode": "kit", "resume": str(killed / "ckpt" / "step=12.ckpt")},
        {"out": str(root / "overlap"), "mode": "overlap", **h.OVERLAP_RUN,
         "resume": str(runs / "overlap" / "ckpt" / "step=4.ckpt")},
    ])
    return root


def test_run_killed_mid_epoch_resumes_bit_identical_to_the_uninterrupted_run(runs, resumed) -> None:
    killed = resumed / "killed"
    assert sorted(os.listdir(killed / "ckpt")) == ["step=12.ckpt", "step=4.ckpt", "step=8.ckpt"]
    assert not (killed / "rank0.pt").exists()  # it died before finishing
    reference = h.same_on_every_rank(h.load_ranks(runs / "kit")[0])
    for state in h.load_ranks(resumed / "kit"):
        state = h.same_on_every_rank(state)
        assert state["norms"] == reference["norms"][12:]  # the resumed steps saw the same norms, same skips
        state["norms"] = reference["norms"]
        # parameters, FusedAdamW state, schedule, clipping (zscore) and guard state: bit-identical
        h.assert_identical(state, reference)


def test_overlap_run_resumes_bit_identical(runs, resumed) -> None:
    reference = h.load_ranks(runs / "overlap")[0]
    for state in h.load_ranks(resumed / "overlap"):
        h.assert_identical(state["params"], reference["params"])
        h.assert_identical(state["optimizer"], reference["optimizer"])
        h.assert_identical(state["scheduler"], reference["scheduler"])


@pytest.mark.parametrize("step", [4, 8])  # mid-epoch 0 (before the NaN step), end of epoch 0
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, step) -> None:
    reference = h.load_ranks(runs / "kit")[0]
    trainer = h.trainer(tmp_path, 1, callbacks=h.kit_callbacks())
    model = h.TinyNet(optim=h.SPEC, nan_step=h.NAN_STEP)
    trainer.fit(model, h.loader(0, 1), ckpt_path=runs / "kit" / "ckpt" / f"step={step}.ckpt")
    state = h.final_state(trainer, model)
    restorer = next(cb for cb in trainer.callbacks if isinstance(cb, RestoreLoaderPosition))
    assert restorer.restored  # the loader's saved position was loaded (Lightning alone drops it)
    h.assert_close(state["params"], reference["params"], atol=1e-6)
    h.assert_identical(state["scheduler"], reference["scheduler"])
    assert state["NonFiniteGuard"][0]["skipped"].item() == 1.0
    assert [skip for _, _, skip in state["norms"]] == [skip for _, _, skip in reference["norms"][step:]]
    for (_, ours, _), (_, theirs, _) in zip(state["norms"], reference["norms"][step:]):
        assert ours == pytest.approx(theirs, rel=1e-5, nan_ok=True)


def test_plain_dataloader_restarts_the_epoch_on_mid_epoch_resume(runs, tmp_path) -> None:
    """Documents Lightning 2.6.6: without a stateful loader a mid-epoch resume replays the epoch's start."""
    reference = h.load_ranks(runs / "kit")[0]
    first = h.trainer(tmp_path / "a", 1, callbacks=h.kit_callbacks(), max_steps=4)
    first.fit(h.TinyNet(optim=h.SPEC, nan_step=h.NAN_STEP), h.loader(0, 1, resumable=False))
    ckpt = tmp_path / "a" / "ckpt" / "step=4.ckpt"
    second = h.trainer(tmp_path / "b", 1, callbacks=h.kit_callbacks())
    model = h.TinyNet(optim=h.SPEC, nan_step=h.NAN_STEP)
    with pytest.warns(PossibleUserWarning, match="not resumable"):
        second.fit(model, h.loader(0, 1, resumable=False), ckpt_path=ckpt)
    drift = max((model.state_dict()[k] - reference["params"][k]).abs().max().item() for k in reference["params"])
    assert drift > 1e-3  # different batches were seen: not the uninterrupted run
    assert torch.isfinite(torch.tensor(drift))
