"""Running statistics of gradient norms, kept on device and checkpointable.

Private to :mod:`lightning_optkit.callbacks`. Every update is branch-free tensor arithmetic
(``torch.where`` instead of ``if``), so tracking costs no host sync. Non-finite norms never enter
the statistics. Statistics are float32, or float64 once a float64 norm arrives (a float64 run's
thresholds are float64 throughout).
"""

from __future__ import annotations

import math

import torch

__all__ = ["RunningNormStats", "NormHistory"]


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = t.dtype if dtype is None else dtype
    return t if t.device == device and t.dtype == dtype else t.to(device, dtype)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class RunningNormStats:
    """Mean and variance of past finite norms: exact averages for ``warmup`` samples, then an EMA.

    One update rule covers both phases: with weight ``w = 1/(n+1)`` while ``n < warmup`` and
    ``w = 1 - alpha`` afterwards, ``mean += w * d`` and ``var = (1 - w) * (var + w * d**2)`` where
    ``d = x - mean`` (exact population mean/variance in warmup, exponential moving ones after).
    """

    def __init__(self, alpha: float, warmup: int) -> None:
        self.alpha = alpha
        self.warmup = warmup
        self.mean = torch.zeros((), dtype=torch.float32)
        self.var = torch.zeros((), dtype=torch.float32)
        self.count = torch.zeros((), dtype=torch.float32)  # finite samples seen (device, no sync)

    def _to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.mean, self.var, self.count = (_on(t, device, dtype) for t in (self.mean, self.var, self.count))

    def ready(self, device: torch.device) -> torch.Tensor:
        """0-d bool: the warmup is over."""
        self._to(device)
        return self.count >= self.warmup

    def upper(self, z: float, device: torch.device) -> torch.Tensor:
        """``mean + z * std`` of the past norms (meaningful once :meth:`ready`)."""
        self._to(device)
        return self.mean + z * self.var.clamp_min(0).sqrt()

    def update(self, x: torch.Tensor, accept: torch.Tensor | None = None) -> None:
        """Add the 0-d norm ``x`` when it is finite (and ``accept``, a 0-d bool, is true)."""
        dtype = _stat_dtype(x)
        self._to(x.device, dtype)
        x = x.to(dtype)
        ok = torch.isfinite(x)
        if accept is not None:
            ok = ok & accept
        w = torch.where(self.count < self.warmup, 1.0 / (self.count + 1.0),
                        torch.full_like(self.count, 1.0 - self.alpha))
        d = torch.where(ok, x, self.mean) - self.mean  # 0 when rejected, avoids NaN arithmetic
        self.mean = torch.where(ok, self.mean + w * d, self.mean)
        self.var = torch.where(ok, (1.0 - w) * (self.var + w * d * d), self.var)
        self.count = self.count + ok.to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Host copies of the statistics (called when checkpointing)."""
        return {"mean": self.mean.detach().cpu(), "var": self.var.detach().cpu(),
                "count": self.count.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore statistics; they move to the gradients' device at the next update."""
        self.mean, self.var, self.count = (state[k].to(_stat_dtype(state[k])).clone()
                                           for k in ("mean", "var", "count"))


class NormHistory:
    """A ring buffer of the last ``length`` finite norms (NaN marks empty slots) with a quantile.

    The write position advances every step (host int, data independent); a non-finite norm is
    stored as NaN, i.e. it leaves a hole, so no sync is needed to decide whether to store it.
    """

    def __init__(self, length: int, quantile: float, warmup: int) -> None:
        self.quantile = quantile
        self.warmup = warmup
        self.buffer = torch.full((length,), math.nan, dtype=torch.float32)
        self.pos = 0

    def _to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.buffer = _on(self.buffer, device, dtype)

    def ready(self, device: torch.device) -> torch.Tensor:
        """0-d bool: at least ``warmup`` finite norms are stored."""
        self._to(device)
        return (~torch.isnan(self.buffer)).sum() >= self.warmup

    def value(self, device: torch.device) -> torch.Tensor:
        """The running quantile of stored norms (NaN while empty)."""
        self._to(device)
        return torch.nanquantile(self.buffer, self.quantile)

    def update(self, x: torch.Tensor) -> None:
        """Store the 0-d norm ``x`` (NaN if it is not finite), overwriting the oldest slot."""
        dtype = _stat_dtype(x)
        self._to(x.device, dtype)
        x = x.to(dtype)
        self.buffer[self.pos] = torch.where(torch.isfinite(x), x, torch.full_like(x, math.nan))
        self.pos = (self.pos + 1) % self.buffer.numel()

    def state_dict(self) -> dict[str, object]:
        """Host copy of the buffer and write position (called when checkpointing)."""
        return {"buffer": self.buffer.detach().cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the history; a different ``length`` keeps the most recent norms that fit."""
        buf = state["buffer"]
        assert isinstance(buf, torch.Tensor)
        pos = int(state["pos"])  # type: ignore[arg-type]
        ordered = torch.cat([buf[pos:], buf[:pos]])  # oldest first
        ordered = ordered.to(_stat_dtype(ordered))
        n = self.buffer.numel()
        ordered = ordered[-n:]
        fresh = torch.full((n,), math.nan, dtype=ordered.dtype)
        fresh[: ordered.numel()] = ordered
        self.buffer = fresh
        self.pos = ordered.numel() % n
