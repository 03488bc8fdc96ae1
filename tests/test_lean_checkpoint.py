"""Lean state through real checkpoints: a Lightning run resumed from its checkpoint file continues bit
for bit; torch AdamW checkpoints load into lean state (quantized) and lean ones convert back."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.optim.fused_adamw import FusedAdamW
from lightning_optkit.optim.lean_state import dequantize, to_adamw_state_dict


class _Net(L.LightningModule):
    def __init__(self, state_dtype: str) -> None:
        super().__init__()
        self.state_dtype = state_dtype
        self.net = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 32))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return FusedAdamW(self.parameters(), lr=1e-2, state_dtype=self.state_dtype, lean_min_numel=1000,
                          max_grad_norm=1.0, rounding_seed=3)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x)), batch_size=16, shuffle=False)


def _fit(state_dtype: str, root, epochs: int, ckpt_path=None) -> _Net:
    torch.manual_seed(0)
    model = _Net(state_dtype)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[ModelCheckpoint(dirpath=str(root), every_n_epochs=1, save_top_k=-1)])
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_resume_from_a_lightning_checkpoint_is_bit_identical(state_dtype, tmp_path):
    whole = _fit(state_dtype, tmp_path / "whole", epochs=4)
    ckpt = tmp_path / "whole" / "epoch=1-step=8.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"]
    want = torch.int8 if state_dtype == "int8" else torch.bfloat16
    assert any(st["exp_avg"].dtype == want for st in saved.values())
    resumed = _fit(state_dtype, tmp_path / "resumed", epochs=4, ckpt_path=str(ckpt))
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    opt_a, opt_b = whole.trainer.optimizers[0], resumed.trainer.optimizers[0]
    for a, b in zip(whole.parameters(), resumed.parameters()):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _step(opt, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_torch_adamw_checkpoint_loads_quantized_and_converts_back(gen, tmp_path):
    shapes = [(64, 300), (300,), (8, 8)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    ref = torch.optim.AdamW(params, lr=1e-2)
    for g in grads[:3]:
        _step(ref, params, g)
    torch.save(ref.state_dict(), tmp_path / "torch.pt")

    kit = FusedAdamW(params, lr=1e-2, state_dtype="int8")
    kit.load_state_dict(torch.load(tmp_path / "torch.pt"))
    big, bias, small = (kit.state[p] for p in params)
    assert big["exp_avg"].dtype == torch.int8 and big["exp_avg_sq"].dtype == torch.uint8
    assert bias["exp_avg"].dtype == small["exp_avg"].dtype == torch.float32  # 1-D and small: fp32
    m, v = dequantize(big)
    m_ref, v_ref = ref.state[params[0]]["exp_avg"], ref.state[params[0]]["exp_avg_sq"]
    # within the code's step: 1/127 of the block maximum for m, 2/255 of sqrt(v)'s maximum for sqrt(v)
    assert (m - m_ref).abs().max() <= m_ref.abs().max() / 120
    assert (v.sqrt() - v_ref.sqrt()).abs().max() <= v_ref.sqrt().max() / 120
    assert torch.equal(bias["exp_avg"], ref.state[params[1]]["exp_avg"])
    assert int(big["step"]) == 3
    for g in grads[3:]:
        _step(kit, params, g)

    # back to torch: the helper's dict loads into torch.optim.AdamW with the dequantized moments
    torch.save(to_adamw_state_dict(kit.state_dict()), tmp_path / "back.pt")
    fresh = [nn.Parameter(p.detach().clone()) for p in params]
    again = torch.optim.AdamW(fresh, lr=1e-2)
    again.load_state_dict(torch.load(tmp_path / "back.pt"))
    m, v = dequantize(kit.state[params[0]])
    assert torch.equal(again.state[fresh[0]]["exp_avg"], m) and torch.equal(again.state[fresh[0]]["exp_avg_sq"], v)
    assert "exp_avg_scale" not in again.state[fresh[0]] and "state_dtype" not in again.param_groups[0]
    assert int(again.state[fresh[0]]["step"]) == 6
    _step(again, fresh, grads[0])
    assert all(torch.isfinite(p).all() for p in fresh)


def test_lean_checkpoint_loads_into_another_state_dtype(gen, tmp_path):
    p = nn.Parameter(torch.randn(64, 300, generator=gen))
    lean = FusedAdamW([p], lr=1e-2, state_dtype="int8")
    for _ in range(2):
        p.grad = torch.randn(p.shape, generator=gen)
        lean.step()
    torch.save(lean.state_dict(), tmp_path / "lean.pt")
    m, v = dequantize(lean.state[p])
    for target, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.int8)):
        opt = FusedAdamW([p], lr=1e-2, state_dtype=target)
        opt.load_state_dict(torch.load(tmp_path / "lean.pt"))
        assert opt.state[p]["exp_avg"].dtype == dtype
        if target == "float32":
            assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)
        if target == "int8":  # the same layout: bit for bit
            for key, value in lean.state[p].items():
                assert torch.equal(opt.state[p][key], value)
