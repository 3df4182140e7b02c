"""GistNet module: exact shift, gradient coverage, drop baseline, checkpoint and export round trips."""

from __future__ import annotations

from itertools import takewhile

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mchar.core.entries import Entry
from mchar.core.gistnet import from_pretrained
from mchar.core.working_context import WorkingContext
from mchar.lit import windows as W
from mchar.lit.gistnet_module import GistNetModule
from tests.lit.helpers import DEPTH, H, K, T, changed, one_step, snapshot, tiny_base, tiny_gistnet, windows


def _module(**kw) -> GistNetModule:
    return GistNetModule(tiny_base(), tiny_gistnet(), block_size=K, depth=DEPTH, horizon=H, max_steps=4, **kw)


def test_all_raw_student_equals_teacher_and_hf_loss() -> None:
    m = _module()
    ids = windows(3)
    p = m.prefix(ids)
    _, _, bank = m.bank(ids, p)
    with torch.no_grad():
        student = m.student_logits(bank, m.same_layout(3, W.raw_layout(p, K), p, p + H), p)
        teacher = W.teacher_logits(m.base, ids, p, H)
        labels = ids[:, : p + H].clone()
        labels[:, :p] = -100
        hf = m.base.model(input_ids=ids[:, : p + H], labels=labels).loss
    targets = ids[:, p : p + H]
    assert torch.allclose(student, teacher, atol=1e-5)
    ours = W.token_nll(student, targets).mean()
    assert abs(float(ours) - float(hf)) < 1e-5


def test_layout_slots_match_working_context() -> None:
    p = 64
    gen = np.random.default_rng(0)
    for _ in range(5):
        ents = W.random_layout(p, K, DEPTH, gen)
        W.check_tiling(ents, K, p)
        wc = WorkingContext(K, DEPTH, 10_000, p, entries=ents)
        offs = W.bank_offsets(p + H, p, K, DEPTH)
        bank, pos = W.prefix_slots(ents, K, offs, "centre")
        assert np.array_equal(pos, wc.position_ids("centre").numpy())
        sm = wc.slot_map()
        lv, node = sm.levels.numpy(), sm.node_index.numpy()
        expect = np.where(lv == 0, node, np.asarray(offs)[lv] + node)
        assert np.array_equal(bank, expect)
    assert any(e.level == 2 for e in W.level_layout(p, K, 2)) and Entry(0, p // K - 1) in W.level_layout(
        p, K, 2
    )


def test_one_step_changes_every_gistnet_param_and_no_base_param() -> None:
    m = _module(contrastive_weight=0.1)
    assert not any(p.requires_grad for p in m.base.parameters())
    before = snapshot(m)
    loss = one_step(m, windows(4), step=0)
    assert torch.isfinite(loss)
    stuck, moved = changed(m, before)
    assert not stuck, f"trainable but unchanged: {sorted(stuck)}"
    assert not moved, f"frozen but changed: {sorted(moved)}"
    opt_params = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.gistnet.parameters()}


def test_validation_reports_gist_and_drop_baselines() -> None:
    out = _module().evaluate_batch(windows(2), 0)
    for key in (
        "dnll",
        "drop_dnll",
        "dnll_lod1",
        "dnll_lod2",
        "drop_dnll_lod1",
        "drop_dnll_lod2",
        "subst_rate",
        "span_dnll",
        "span_drop_dnll",
        "teacher_nll",
    ):
        assert key in out and torch.isfinite(out[key]).all(), key


def test_checkpoint_holds_gistnet_not_base_and_reloads(tmp_path) -> None:
    m = _module()
    dm = W.StepDataModule(windows(8), windows(2, seed=1), batch_size=2, max_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(m, datamodule=dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(state) == {f"gistnet.{k}" for k in m.gistnet.state_dict()}
    fresh = GistNetModule.load_from_checkpoint(ckpt, base=tiny_base(), gistnet=tiny_gistnet())
    for k, v in m.gistnet.state_dict().items():
        assert torch.equal(v, fresh.gistnet.state_dict()[k])


def test_export_loads_without_lightning(tmp_path) -> None:
    m = _module()
    m.export(tmp_path / "g")
    assert (tmp_path / "g" / "model.safetensors").exists() and (tmp_path / "g" / "config.json").exists()
    g = from_pretrained(tmp_path / "g")
    x = torch.randn(3, K, 32)
    assert torch.allclose(g(x, 1), m.gistnet(x, 1)) and torch.allclose(g(x, 2), m.gistnet(x, 2))


def test_horizon_sees_every_slot_before_and_after_gists() -> None:
    """Regression: without an explicit mask, transformers reads position jumps (gists) as packed-sequence
    boundaries and blocks attention across them; every prefix slot must influence the horizon."""
    m = _module()
    ids = windows(1)
    p = m.prefix(ids)
    _, _, bank = m.bank(ids, p)
    ents = W.level_layout(p, K, 1)
    rows = W.build_rows(m.same_layout(1, ents, p, p + H), p, H)
    emb = W.gather_rows(bank.detach(), rows).requires_grad_(True)
    W.horizon_logits(m.base, emb, rows, H).sum().backward()
    assert (emb.grad[0, :-1].abs().sum(-1) > 0).all()


def test_left_padding_does_not_change_logits() -> None:
    m = _module()
    ids = windows(2)
    p = m.prefix(ids)
    _, _, bank = m.bank(ids, p)
    offs = W.bank_offsets(p + H, p, K, DEPTH)
    short = W.prefix_slots(W.level_layout(p, K, 2), K, offs)
    long = W.prefix_slots(W.raw_layout(p, K), K, offs)
    with torch.no_grad():
        alone = W.horizon_logits(
            m.base, *(lambda r: (W.gather_rows(bank, r), r))(W.build_rows([(0, *short)], p, H)), H
        )
        both = W.build_rows([(0, *short), (1, *long)], p, H)
        assert both.padded
        mixed = W.horizon_logits(m.base, W.gather_rows(bank, both), both, H)
    assert torch.allclose(alone[0], mixed[0], atol=1e-5)


def validations(*settings: dict) -> list[dict[str, torch.Tensor]]:
    """The validation metrics of one batch under each of ``settings``, every module over the same base and GistNet."""
    torch.manual_seed(0)
    base, gist = tiny_base(), tiny_gistnet()
    kw = dict(block_size=K, depth=DEPTH, horizon=H, max_steps=4)
    ids = windows(2)
    return [GistNetModule(base, gist, **kw, **extra).evaluate_batch(ids, 0) for extra in settings]


def test_validation_mix_does_not_follow_the_training_raw_prob() -> None:
    """``raw_prob`` shapes training layouts only; the validation mix uses ``val_raw_prob`` (comparable ablations)."""
    a, b, c = validations({"raw_prob": 0.0}, {"raw_prob": 0.9}, {"raw_prob": 0.0, "val_raw_prob": 0.9})
    assert torch.equal(a["dnll"], b["dnll"])
    assert not torch.equal(a["dnll"], c["dnll"])
    assert torch.equal(a["dnll_lod1"], c["dnll_lod1"])  # single-level layouts do not use the mix at all


def test_validation_layouts_do_not_follow_the_training_raw_tail() -> None:
    """``keep_raw_blocks`` shapes training layouts only; validation keeps ``val_keep_raw_blocks`` raw."""
    a, b, c = validations({}, {"keep_raw_blocks": 6, "keep_raw_max": 8}, {"val_keep_raw_blocks": 6})
    for name in ("dnll", "dnll_lod1", "drop_dnll_lod1", "dnll_lod2"):
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["dnll_lod1"], c["dnll_lod1"])


def raw_tail(entries: list[Entry]) -> int:
    """How many newest entries are raw blocks."""
    return sum(1 for _ in takewhile(lambda e: not e.level, reversed(entries)))


@settings(max_examples=40, deadline=None)
@given(low=st.integers(0, 8), span=st.integers(0, 8), step=st.integers(0, 10_000))
def test_training_layouts_keep_a_drawn_raw_tail(low: int, span: int, step: int) -> None:
    """With ``keep_raw_max`` every training layout keeps between ``keep_raw_blocks`` and ``keep_raw_max`` newest blocks
    raw (and tiles the prefix); without it the stream is the fixed-tail one, unchanged."""
    p = T - H
    n_blocks = p // K
    m = _module(keep_raw_blocks=low, keep_raw_max=low + span, raw_prob=0.0)
    ents = m.train_layout(step, p)
    W.check_tiling(ents, K, p)
    tail = raw_tail(ents)
    # at raw_prob 0 every block before the kept tail is under a gist: the tail is exactly the drawn keep
    assert min(low, n_blocks) <= tail <= min(low + span, n_blocks)
    fixed = _module(keep_raw_blocks=low, raw_prob=0.0).train_layout(step, p)
    gen = np.random.default_rng(W.step_seed(0, step, 3))
    assert fixed == W.random_layout(p, K, DEPTH, gen, low, 0.0)


def test_drawn_raw_tails_cover_the_range() -> None:
    p = T - H
    m = _module(keep_raw_blocks=1, keep_raw_max=p // K, raw_prob=0.0)
    assert {raw_tail(m.train_layout(step, p)) for step in range(400)} == set(range(1, p // K + 1))


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(4, 80), seed=st.integers(0, 2**16), edits=st.integers(0, 6))
def test_session_layouts_tile_the_prefix_within_the_budget(budget: int, seed: int, edits: int) -> None:
    p = T - H
    ents = W.session_layout(p, K, DEPTH, budget, np.random.default_rng(seed), edits)
    W.check_tiling(ents, K, p)
    assert sum(e.cost(K) for e in ents) <= budget
    recency_first = W.session_layout(p, K, DEPTH, budget, np.random.default_rng(seed), 0)
    levels = [e.level for e in recency_first]
    assert levels == sorted(levels, reverse=True)  # coarse far back, raw at the present
    all_raw = max(levels) == 0
    assert all_raw or sum(e.cost(K) for e in recency_first) > budget - (K - 1)  # as much raw as fits


def test_session_share_trains_on_session_wcs_and_validation_scores_the_cover() -> None:
    p = T - H
    m = _module(budget=24, session_share=1.0)
    for step in range(6):
        ents = m.train_layout(step, p)
        W.check_tiling(ents, K, p)
        assert sum(e.cost(K) for e in ents) <= 24
    # session_share 0 keeps the random layouts (and their random stream) as they were
    off = _module(budget=24)
    gen = np.random.default_rng(W.step_seed(0, 3, 3))
    assert off.train_layout(3, p) == W.random_layout(p, K, DEPTH, gen, 1, 0.25)
    out = m.evaluate_batch(windows(2), 0)
    for key in ("dnll_session", "drop_dnll_session"):
        assert torch.isfinite(out[key]).all(), key
    assert not torch.equal(out["dnll_session"], out["drop_dnll_session"])
    assert "dnll_session" not in _module().evaluate_batch(windows(2), 0)
    before = snapshot(m)
    assert torch.isfinite(one_step(m, windows(4), step=0))
    stuck, moved = changed(m, before)
    assert not stuck and not moved
    with pytest.raises(ValueError, match="session_share"):
        _module(session_share=0.5)


@settings(max_examples=30, deadline=None)
@given(keep=st.integers(0, (T - H) // K), step=st.integers(0, 10_000))
def test_upper_layouts_hold_one_upper_level_behind_the_raw_tail(keep: int, step: int) -> None:
    """The upper term's layout tiles the prefix with level-2 nodes and raw blocks only, keeps at least ``keep`` newest
    blocks raw, and exists exactly when a level-2 node fits before them."""
    p = T - H
    ents = _module(upper_keep_raw_blocks=keep).upper_layout(step, p)
    fits = p // K - keep >= K
    assert (ents is not None) == fits
    if ents is not None:
        W.check_tiling(ents, K, p)
        levels = {e.level for e in ents}
        assert 2 in levels and levels <= {0, 2}
        assert raw_tail(ents) >= keep


def test_upper_term_trains_the_upper_net_alone() -> None:
    """With one net per level, the upper term's gradient reaches the level-2 net and never the level-1 net."""
    torch.manual_seed(0)
    m = GistNetModule(
        tiny_base(),
        tiny_gistnet(shared=False),
        block_size=K,
        depth=DEPTH,
        horizon=H,
        max_steps=4,
        upper_keep_raw_blocks=4,
    )
    ids = windows(2)
    p = m.prefix(ids)
    targets = ids[:, p : p + H]
    teacher = W.teacher_logits(m.base, ids, p, H)
    tok, gists, _ = m.bank(ids, p)
    m.upper_loss(tok, gists, p, 0, teacher, targets).backward()
    grads = {n: q.grad for n, q in m.gistnet.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("nets.0."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("nets.1."))


def test_upper_weight_adds_its_weighted_term_and_zero_changes_nothing() -> None:
    torch.manual_seed(0)
    base, gist = tiny_base(), tiny_gistnet(shared=False)
    kw = dict(block_size=K, depth=DEPTH, horizon=H, max_steps=4, upper_keep_raw_blocks=4)
    ids = windows(2)
    off, logs_off = GistNetModule(base, gist, **kw).compute_loss(ids, 3)
    on, logs_on = GistNetModule(base, gist, upper_weight=0.5, **kw).compute_loss(ids, 3)
    assert "upper_loss" not in logs_off
    assert torch.allclose(on - off, 0.5 * logs_on["upper_loss"], atol=1e-6)
    assert float(logs_on["upper_loss"]) > 0
    # one optimisation step moves every trainable parameter and no frozen one
    m = GistNetModule(base, gist, upper_weight=0.5, **kw)
    before = snapshot(m)
    one_step(m, ids)
    stuck, moved = changed(m, before)
    assert not stuck and not moved


def test_validation_layouts_follow_val_seed_not_the_training_seed() -> None:
    """Seed replicates validate on the same mixed layouts (``val_seed``); another ``val_seed`` draws others."""
    a, b, c = validations({"seed": 0}, {"seed": 5}, {"seed": 0, "val_seed": 5})
    assert torch.equal(a["dnll"], b["dnll"])
    assert not torch.equal(a["dnll"], c["dnll"])
