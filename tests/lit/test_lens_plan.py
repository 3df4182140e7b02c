"""LensNet step plans prepared by DataLoader workers: the same batches, plans and losses as built in the step."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mchar.lit import windows as W
from mchar.lit.lens_plan import LensPlan
from mchar.lit.lensnet_module import LensNetModule
from tests.lit.helpers import DEPTH, H, K, T, tiny_base, tiny_gistnet, tiny_lensnet, windows


def _module(**kw) -> LensNetModule:
    torch.manual_seed(0)
    return LensNetModule(
        tiny_base(),
        tiny_gistnet(),
        tiny_lensnet(),
        block_size=K,
        depth=DEPTH,
        budget=24,
        horizon=H,
        candidates=6,
        max_steps=6,
        random_fill=0.5,
        **kw,
    )


def _loader(module: LensNetModule, workers: int, stop: int = 7) -> DataLoader:
    ds = W.StepBatches(windows(16), 3, seed=5, start=0, stop=stop, plan=module.planner)
    return DataLoader(ds, batch_size=None, num_workers=workers)


def test_worker_plans_come_in_step_order_and_equal_the_in_step_ones() -> None:
    m = _module()
    prefix = W.prefix_len(T, H, K)
    got = list(_loader(m, workers=2))
    assert len(got) == 7
    kinds = set()
    for step, (ids, plan) in enumerate(got):
        assert torch.equal(ids, W.StepBatches(windows(16), 3, seed=5, start=0, stop=7).batch(step))
        entries, cand = m.sample_step(step, prefix)
        assert plan.entries == entries and np.array_equal(plan.cand, cand)
        ref = m.planner.plan(entries, cand, prefix)
        for a, b in zip(plan.rows.tensors(), ref.rows.tensors(), strict=True):
            assert torch.equal(a, b)
        assert plan.sign.tolist() == [1.0 if entries[int(i)].level > 0 else -1.0 for i in cand]
        kinds.add(min(e.level for e in entries[: len(entries) // 2]))
    assert kinds == {0, 1}  # both kinds of training WC (recency-first and random-fill) were planned


def test_a_prepared_plan_gives_exactly_the_in_step_loss() -> None:
    m = _module(utility="expected")
    for step, (ids, plan) in enumerate(_loader(m, workers=0)):
        prepared, _ = m.step_loss((ids, plan), step)
        in_step, _ = m.step_loss(ids, step)
        assert torch.equal(prepared, in_step)


def test_an_on_policy_step_ignores_the_prepared_plan() -> None:
    m = _module(on_policy=1.0)
    ids, plan = next(iter(_loader(m, workers=0)))
    wrong = m.planner.plan(*m.sample_step(99, W.prefix_len(T, H, K)), W.prefix_len(T, H, K))
    assert torch.equal(m.step_loss((ids, wrong), 0)[0], m.step_loss(ids, 0)[0])
    assert isinstance(plan, LensPlan)


def fit_lensnet(workers: int, tmp_path, accelerator: str = "cpu") -> dict[str, torch.Tensor]:
    """LensNet's weights after a 5-step Lightning fit with plans from ``workers`` DataLoader workers (0: in-step)."""
    m = _module()
    dm = W.StepDataModule(
        windows(16),
        windows(4, seed=1),
        batch_size=3,
        max_steps=5,
        seed=5,
        plan=m.planner,
        plan_workers=workers,
    )
    trainer = L.Trainer(
        max_steps=5,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=dm)
    return {k: v.detach().cpu().clone() for k, v in m.lensnet.state_dict().items()}


def test_a_fit_with_plan_workers_trains_the_same_weights(tmp_path) -> None:
    inline, workers = fit_lensnet(0, tmp_path / "a"), fit_lensnet(2, tmp_path / "b")
    assert all(torch.equal(inline[k], workers[k]) for k in inline)


def test_plan_workers_need_a_plan() -> None:
    with pytest.raises(ValueError, match="plan_workers=1 needs a plan"):
        W.StepDataModule(windows(4), None, batch_size=2, max_steps=2, plan_workers=1)
