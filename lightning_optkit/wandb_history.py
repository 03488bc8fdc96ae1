"""Read the logged history back from an offline W&B run's ``.wandb`` file, without network or account.

The file (wandb 0.31) is a 7-byte header (``:W&B``, magic ``0xBEE1`` little-endian, version byte)
followed by a LevelDB-style log: 32 KiB blocks counted from the start of the file; each chunk is
``crc (uint32 LE), length (uint16 LE), type (uint8)`` then ``length`` bytes; type 1 is a whole
record, 2/3/4 the first/middle/last pieces of a record split across blocks, 0 padding; fewer than
7 bytes left in a block are padding. The checksum is the plain (unmasked) IEEE CRC-32 of the type
byte followed by the data (checked against files written by wandb-core 0.31). Each record is a
``wandb.proto.wandb_internal_pb2.Record``; history rows carry items with ``key`` (or
``nested_key``) and ``value_json``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["WandbFileError", "find_run_dir", "iter_records", "read_history"]

_HEADER = b":W&B"
_MAGIC = 0xBEE1
_FILE_HEADER_LEN = 7
_BLOCK_LEN = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_PAD, _FULL, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a readable ``.wandb`` log (bad header, checksum or chunk sequence)."""


def find_run_dir(save_dir: str | Path) -> Path:
    """The newest run directory under ``save_dir`` (a WandbLogger ``save_dir`` or its ``wandb/`` folder).

    Looks for ``offline-run-*`` and ``run-*`` folders holding a ``.wandb`` file and returns the most
    recently modified one. Raises FileNotFoundError naming the folder when there is none.
    """
    root = Path(save_dir)
    candidates: list[Path] = []
    for base in (root / "wandb", root):
        if base.is_dir():
            candidates += [
                d for d in base.iterdir()
                if d.is_dir() and not d.is_symlink() and d.name.startswith(("offline-run-", "run-"))
                and any(d.glob("*.wandb"))
            ]
    if not candidates:
        raise FileNotFoundError(
            f"save_dir={str(root)!r} holds no W&B run (no 'offline-run-*/' or 'run-*/' folder with a .wandb "
            "file). Fix: pass the save_dir given to WandbLogger, after the run has started."
        )
    return max(candidates, key=lambda d: (max(f.stat().st_mtime for f in d.glob("*.wandb")), d.name))


def _wandb_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"run_dir_or_wandb_file={str(path)!r} does not exist. "
                                "Fix: pass a run folder, a WandbLogger save_dir or a .wandb file.")
    files = sorted(path.glob("*.wandb"))
    if not files:
        files = sorted(find_run_dir(path).glob("*.wandb"))
    if len(files) > 1:
        raise WandbFileError(f"run_dir_or_wandb_file={str(path)!r} holds several .wandb files {files}. "
                             "Fix: pass one of them.")
    return files[0]


def _iter_payloads(data: bytes, verify_crc: bool) -> Iterator[bytes]:
    """Yield the reassembled record payloads of a LevelDB-style log (file header already checked)."""
    pos = _FILE_HEADER_LEN
    pieces: list[bytes] | None = None
    while pos < len(data):
        left_in_block = _BLOCK_LEN - pos % _BLOCK_LEN
        if left_in_block < _CHUNK_HEADER.size:  # block trailer: padding
            pos += left_in_block
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            break  # truncated tail (a run still being written)
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        end = start + length
        if end > len(data):
            break
        body = data[start:end]
        pos = end
        if kind == _PAD:
            if length == 0 and crc == 0:  # zero-filled rest of a block
                pos += _BLOCK_LEN - pos % _BLOCK_LEN if pos % _BLOCK_LEN else 0
            continue
        if verify_crc and zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise WandbFileError(f"chunk at byte {start - _CHUNK_HEADER.size} has a bad checksum (corrupt "
                                 "or not a .wandb file). Fix: pass verify_crc=False to skip the check.")
        if kind == _FULL:
            pieces = None
            yield body
        elif kind == _FIRST:
            pieces = [body]
        elif kind == _MIDDLE and pieces is not None:
            pieces.append(body)
        elif kind == _LAST and pieces is not None:
            pieces.append(body)
            yield b"".join(pieces)
            pieces = None
        else:
            raise WandbFileError(f"chunk type {kind} at byte {start - _CHUNK_HEADER.size} "
                                 "is out of sequence.")


def _parse(path: Path, verify_crc: bool) -> list[Any]:
    from wandb.proto import wandb_internal_pb2  # lazy: wandb is an optional dependency

    data = path.read_bytes()
    if len(data) < _FILE_HEADER_LEN or data[:4] != _HEADER:
        raise WandbFileError(f"{path!s} does not start with {_HEADER!r}: not a .wandb file.")
    (magic,) = struct.unpack_from("<H", data, 4)
    if magic != _MAGIC:
        raise WandbFileError(f"{path!s} has magic {magic:#x}, expected {_MAGIC:#x}.")
    records = []
    for payload in _iter_payloads(data, verify_crc):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def iter_records(run_dir_or_wandb_file: str | Path, *, verify_crc: bool = True,
                 timeout: float = 10.0) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` of a run, in file order.

    ``wandb.finish()`` can return while wandb-core is still flushing the file, so until the run's
    ``exit`` record (written last) is in the file this re-reads it for up to ``timeout`` seconds, then
    raises WandbFileError. ``timeout=0`` reads whatever is there now (a live or crashed run).
    """
    path = _wandb_file(run_dir_or_wandb_file)
    deadline = time.monotonic() + timeout
    while True:
        records = _parse(path, verify_crc)
        if timeout <= 0 or any(r.WhichOneof("record_type") == "exit" for r in records):
            return iter(records)
        if time.monotonic() >= deadline:
            raise WandbFileError(
                f"{path!s} has no exit record after {timeout} s: the run is still running, is still being "
                "flushed, or crashed. Fix: call wandb.finish() first, or pass timeout=0 to read the rows "
                "written so far."
            )
        time.sleep(0.05)


def _items_to_dict(items: Any) -> dict[str, Any]:
    """History items as a dict; a ``nested_key`` path becomes nested dicts (as wandb itself reads them)."""
    row: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        level = row
        for part in path[:-1]:
            level = level.setdefault(part, {})
        level[path[-1]] = json.loads(item.value_json)
    return row


def read_history(run_dir_or_wandb_file: str | Path, *, verify_crc: bool = True,
                 timeout: float = 10.0) -> list[dict[str, Any]]:
    """The logged history rows of a run, one dict per ``run.log`` call, in order.

    Accepts a ``.wandb`` file, a run folder or a WandbLogger ``save_dir`` (its newest run is read).
    Values are decoded from JSON; W&B's own ``_step``, ``_runtime`` and ``_timestamp`` are kept.
    Call ``wandb.finish()`` first; ``timeout`` is as in :func:`iter_records`.
    """
    return [
        _items_to_dict(record.history.item)
        for record in iter_records(run_dir_or_wandb_file, verify_crc=verify_crc, timeout=timeout)
        if record.WhichOneof("record_type") == "history"
    ]
