"""End-to-end module: LoRA identity at init, alternating schedule, every trainable param moves, ablations."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mchar.lit import windows as W
from mchar.lit.e2e_module import E2EModule, lora_disabled
from tests.lit.helpers import (
    DEPTH,
    H,
    K,
    changed,
    featured_lensnet,
    snapshot,
    tiny_base,
    tiny_gistnet,
    tiny_lensnet,
    windows,
)


def _module(**kw) -> E2EModule:
    kw.setdefault("weight_decay", 0.0)
    return E2EModule(
        tiny_base(),
        tiny_gistnet(),
        tiny_lensnet(),
        block_size=K,
        depth=DEPTH,
        budget=24,
        horizon=H,
        candidates=4,
        max_steps=4,
        alloc_rounds=4,
        **kw,
    )


def _steps(m: E2EModule, n: int) -> None:
    opt = m.configure_optimizers()["optimizer"]
    for step in range(n):
        opt.zero_grad(set_to_none=True)
        loss, _ = m.step_loss(windows(3, seed=step), step)
        loss.backward()
        opt.step()


def test_lora_starts_as_identity_and_teacher_ignores_it() -> None:
    m = _module(lora=True)
    ref = tiny_base()
    ids = windows(2)
    with torch.no_grad():
        assert torch.allclose(m.base.forward_ids(ids), ref.forward_ids(ids), atol=1e-6)
        m.lora_layers[0].lora_b.fill_(0.5)
        with lora_disabled(m.lora_layers):
            assert torch.allclose(m.base.forward_ids(ids), ref.forward_ids(ids), atol=1e-6)
        assert not torch.allclose(m.base.forward_ids(ids), ref.forward_ids(ids), atol=1e-3)


def test_joint_lora_moves_every_trainable_param_and_no_frozen_one() -> None:
    """Two steps: LoRA's A gets zero gradient while B is still zero (standard init), so one step is not enough."""
    m = _module(schedule="joint", lora=True)
    before = snapshot(m)
    _steps(m, 2)
    stuck, moved = changed(m, before)
    assert not stuck and not moved, (sorted(stuck), sorted(moved))
    assert any("lora_a" in n for n, p in m.named_parameters() if p.requires_grad)


def test_alternating_schedule_and_ablations() -> None:
    m = _module()
    assert [m.phase(s) for s in range(4)] == ["lens", "gist", "lens", "gist"]
    before = snapshot(m)
    _steps(m, 1)  # step 0: LensNet only
    stuck, _ = changed(m, before)
    assert all(n.startswith("gistnet.") for n in stuck) and not any(n.startswith("lensnet.") for n in stuck)
    assert _module(train_lensnet=False).phase(0) == "gist"
    assert _module(train_gistnet=False).phase(1) == "lens"
    with pytest.raises(ValueError):
        _module(train_gistnet=False, train_lensnet=False)


def test_gist_step_uses_allocator_wcs_within_budget() -> None:
    m = _module()
    loss, logs = m.step_loss(windows(2), 1)
    assert torch.isfinite(loss) and "gist_dnll" in logs
    p = W.prefix_len(windows(1).shape[1], H, K)
    tok = m.base.embed(windows(2)[:, :p])
    for wc in m.allocate("lensnet", 2, tok, m.gists(tok, p), p, __import__("numpy").random.default_rng(0)):
        assert wc.cost <= 24


def test_checkpoint_and_export_contain_every_trained_module(tmp_path) -> None:
    m = _module(lora=True)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    keys = set(ckpt["state_dict"])
    assert any(k.startswith("gistnet.") for k in keys) and any(k.startswith("lensnet.") for k in keys)
    base_keys = {k for k in keys if k.startswith("base.")}
    assert base_keys and all("lora_" in k for k in base_keys)
    m.export(tmp_path)
    assert (tmp_path / "gistnet" / "model.safetensors").exists() and (
        tmp_path / "lensnet" / "config.json"
    ).exists()
    assert set(load_file(str(tmp_path / "lora.safetensors"))) == {k[len("base.model.") :] for k in base_keys}
    # the adapter loads onto a fresh base without Lightning and reproduces the trained module's base exactly
    from mchar.core.lora import load_lora

    with torch.no_grad():
        for layer in m.lora_layers:
            layer.lora_b.normal_(std=0.5)
        m.export(tmp_path)
        fresh = tiny_base()
        load_lora(fresh.model, tmp_path)
        ids = windows(1)[:, :16]
        assert torch.allclose(fresh.model(ids).logits, m.base.model(ids).logits, atol=1e-6)
        assert not torch.allclose(tiny_base().model(ids).logits, m.base.model(ids).logits, atol=1e-3)


def test_a_lexical_lensnet_drives_the_gist_steps_allocator() -> None:
    """The e2e GistNet phase allocates with LensNet's scores: a LensNet reading lexical scores gets the windows' ids
    there too, and both phases train every trainable parameter."""
    m = E2EModule(tiny_base(), tiny_gistnet(), featured_lensnet(), block_size=K, depth=DEPTH, budget=24, horizon=H, candidates=4,
                  max_steps=4, alloc_rounds=4, weight_decay=0.0)  # fmt: skip
    before = snapshot(m)
    _steps(m, 2)  # alternate: step 0 LensNet, step 1 GistNet
    stuck, moved = changed(m, before)
    assert not stuck and not moved, (sorted(stuck), sorted(moved))
