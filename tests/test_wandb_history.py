"""read_history / find_run_dir on real offline W&B runs (no mock of wandb)."""

from __future__ import annotations

import shutil

import pytest

wandb = pytest.importorskip("wandb")

from lightning_optkit.wandb_history import WandbFileError, find_run_dir, iter_records, read_history  # noqa: E402


@pytest.fixture
def offline_run(tmp_path):
    """A finished offline run: three scalar rows, a nested row and a row far larger than a 32 KiB block."""
    run = wandb.init(dir=str(tmp_path), project="optkit-tests", mode="offline")
    rows = [{"loss": 1.0 / (i + 1), "lr/pg0": 0.1 * i, "trainer/global_step": i} for i in range(3)]
    for row in rows:
        run.log(row)
    run.log({"nested": {"a": 1, "b": {"c": 2.5}}})
    big = "".join(chr(ord("a") + i % 26) for i in range(100_000))  # spans 4 blocks: FIRST, MIDDLE, LAST
    run.log({"big": big, "after_big": 7})
    run.log({"tail": -3})
    wandb.finish()
    list(iter_records(tmp_path))  # waits until wandb-core has flushed the whole file (its exit record)
    return tmp_path, rows, big


def test_reads_back_every_row_in_order(offline_run):
    save_dir, rows, big = offline_run
    history = read_history(save_dir)
    assert [h["_step"] for h in history] == list(range(6))
    for got, want in zip(history[:3], rows, strict=True):
        assert {k: got[k] for k in want} == want
    assert history[3]["nested"] == {"a": 1, "b": {"c": 2.5}}
    assert history[4]["big"] == big and history[4]["after_big"] == 7
    assert history[5]["tail"] == -3  # the record after the multi-block one is still found


def test_find_run_dir_and_the_three_ways_to_name_a_run(offline_run):
    save_dir, _, _ = offline_run
    run_dir = find_run_dir(save_dir)
    assert run_dir.name.startswith("offline-run-")
    wandb_file = next(run_dir.glob("*.wandb"))
    assert read_history(run_dir) == read_history(wandb_file) == read_history(save_dir)


def test_find_run_dir_picks_the_newest_run(offline_run):
    save_dir, _, _ = offline_run
    first = find_run_dir(save_dir)
    run = wandb.init(dir=str(save_dir), project="optkit-tests", mode="offline")
    run.log({"second": 1})
    wandb.finish()
    newest = find_run_dir(save_dir)
    assert newest != first
    assert read_history(save_dir)[0]["second"] == 1


def test_corrupt_chunk_fails_the_checksum(offline_run, tmp_path_factory):
    save_dir, rows, _ = offline_run
    original = next(find_run_dir(save_dir).glob("*.wandb"))
    broken = tmp_path_factory.mktemp("broken") / "run-x.wandb"
    shutil.copy(original, broken)
    data = bytearray(broken.read_bytes())
    marker = data.find(b"lr/pg0")  # a byte of a history item's key: "lr/pg0" becomes "mr/pg0"
    assert marker > 0
    data[marker] ^= 0x01
    broken.write_bytes(bytes(data))
    with pytest.raises(WandbFileError, match="bad checksum"):
        read_history(broken)
    assert len(read_history(broken, verify_crc=False)) == 6  # the check is what caught it


def test_unfinished_file_waits_then_raises_or_reads_what_is_there(offline_run, tmp_path_factory):
    save_dir, rows, _ = offline_run
    data = next(find_run_dir(save_dir).glob("*.wandb")).read_bytes()
    cut = data.find(b"after_big") - 20  # inside row 4, the record that spans several blocks
    assert cut > 7, "the run file does not hold row 4"
    partial = tmp_path_factory.mktemp("partial") / "run-x.wandb"
    partial.write_bytes(data[:cut])
    with pytest.raises(WandbFileError, match="no exit record after 0.2 s"):
        read_history(partial, timeout=0.2)
    history = read_history(partial, timeout=0)
    assert [h["_step"] for h in history] == [0, 1, 2, 3] and history[2]["loss"] == rows[2]["loss"]


def test_not_a_wandb_file_and_no_run(tmp_path):
    bogus = tmp_path / "x.wandb"
    bogus.write_bytes(b"PK\x03\x04 not wandb")
    with pytest.raises(WandbFileError, match="not a .wandb file"):
        read_history(bogus)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no W&B run"):
        find_run_dir(empty)
