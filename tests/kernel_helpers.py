"""Shared by the kernel tests: run a test on the torch backend or on Triton's CPU interpreter."""

from __future__ import annotations

import pytest


def use_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Turn on Triton's CPU interpreter for this test only (kernels are built per mode on demand)."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return backend
