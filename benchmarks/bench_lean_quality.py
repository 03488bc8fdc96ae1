"""Quality of lean optimizer state: a small character-level transformer LM through ``lightning.Trainer``.

The text ships with CPython (``pydoc_data.topics``, the interactive help pages: ~700k characters of
English and code). Each optimizer trains the same model from the same seed on the same batches; the
final validation loss (``trainer.validate`` on held-out text) is printed per seed, with the mean and
the seed-to-seed spread. Optimizers: ``torch.optim.AdamW`` (fp32 state), FusedAdamW with
``state_dtype="bfloat16"`` and ``"int8"``, and with ``--torchao`` torchao's ``AdamW8bit`` (it runs on
CPU, compiling one step per parameter shape with torch.compile).

The check: mean int8 validation loss within 1% of the fp32 AdamW mean.

Run: ``python benchmarks/bench_lean_quality.py [--steps 300] [--seeds 0 1 2] [--torchao] [--kit-fp32]``
(defaults sized for a shared 2-core machine: about 10 minutes, about 25 with ``--torchao``).
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import statistics
import time
import warnings

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_optkit.optim.fused_adamw import FusedAdamW

SEQ, BATCH, WIDTH, LAYERS, HEADS = 32, 16, 64, 2, 4
LR, WD = 2e-3, 0.01


def corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, val ids, vocabulary size): printable ASCII, everything else mapped to one symbol."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = torch.tensor([min(max(ord(c) - 31, 0), 96) if c != "\n" else 0 for c in text], dtype=torch.long)
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:], 97


class Windows(Dataset):
    """``count`` windows of ``SEQ + 1`` tokens at offsets drawn from ``seed``."""

    def __init__(self, ids: torch.Tensor, count: int, seed: int) -> None:
        self.ids = ids
        self.starts = torch.randint(0, len(ids) - SEQ - 1, (count,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.ids[self.starts[i]: self.starts[i] + SEQ + 1]
        return w[:-1], w[1:]


class TinyLM(L.LightningModule):
    """A 2-layer pre-norm causal transformer over characters (about 110k parameters)."""

    def __init__(self, vocab: int, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.embed = nn.Embedding(vocab, WIDTH)
        self.pos = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=False)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WD)
        if self.optimizer_name == "torchao_8bit":
            from torchao.optim import AdamW8bit

            return AdamW8bit(self.parameters(), lr=LR, weight_decay=WD)
        state_dtype = self.optimizer_name.removeprefix("kit_")
        return FusedAdamW(self.parameters(), lr=LR, weight_decay=WD, state_dtype=state_dtype)


def run(optimizer: str, seed: int, steps: int, data: tuple[torch.Tensor, torch.Tensor, int]) -> tuple[float, float]:
    """(final validation loss, seconds) of one training run."""
    train, val, vocab = data
    L.seed_everything(seed, verbose=False)
    model = TinyLM(vocab, optimizer)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(Windows(train, steps * BATCH, seed), batch_size=BATCH))
    seconds = time.perf_counter() - start
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    result = trainer.validate(model, DataLoader(Windows(val, 64 * BATCH, 12345), batch_size=BATCH), verbose=False)
    return result[0]["val_loss"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--torchao", action="store_true", help="add torchao's AdamW8bit (compiles per shape)")
    parser.add_argument("--kit-fp32", action="store_true", help="also run FusedAdamW with fp32 state")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    optimizers = ["adamw"] + (["kit_float32"] if args.kit_fp32 else []) + ["kit_bfloat16", "kit_int8"]
    if args.torchao:
        try:
            import torchao.optim  # noqa: F401

            optimizers.append("torchao_8bit")
        except Exception as err:  # noqa: BLE001 - any import failure means: no peer here
            print(f"torchao unavailable ({type(err).__name__}: {err}); its row is left out")
    data = corpus()
    n_params = sum(p.numel() for p in TinyLM(data[2], "adamw").parameters())
    print(f"TinyLM: {n_params} parameters, {args.steps} steps of {BATCH} x {SEQ} tokens, seeds {args.seeds}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    losses: dict[str, list[float]] = {name: [] for name in optimizers}
    for seed in args.seeds:
        for name in optimizers:
            loss, seconds = run(name, seed, args.steps, data)
            losses[name].append(loss)
            print(f"seed {seed}  {name:13s} val loss {loss:.4f}  ({seconds:.0f} s)", flush=True)
    base = statistics.mean(losses["adamw"])
    print(f"\n{'optimizer':13s} {'mean':>8s} {'spread':>8s} {'std':>8s} {'vs AdamW':>9s}   per seed")
    for name, values in losses.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:13s} {mean:8.4f} {max(values) - min(values):8.4f} {std:8.4f} {100 * (mean / base - 1):+8.2f}%   "
              + " ".join(f"{v:.4f}" for v in values))
    gap = statistics.mean(losses["kit_int8"]) / base - 1
    verdict = "met" if abs(gap) <= 0.01 else "NOT met"
    print(f"\nint8 state vs fp32 AdamW: {100 * gap:+.2f}% (target within 1%): {verdict}")


if __name__ == "__main__":
    main()
