"""Gist exposure: the summarised layout, exact reduction to the plain LM loss, gradients, the module hook."""

from __future__ import annotations

import numpy as np
import torch

from mchar.base.adapter import tiny_causal_lm
from mchar.lit import windows as W
from mchar.lit.base_lm import BaseLMModule, next_token_loss
from mchar.lit.gist_exposure import gist_exposure_loss, gisted_inputs
from tests.lit.helpers import DEPTH, K, T, windows


def test_layout_puts_summaries_at_span_centres_and_keeps_raw_tokens_in_place() -> None:
    torch.manual_seed(0)
    emb = torch.randn(2, T, 8)
    x, pos, token_pos = gisted_inputs(emb, K, DEPTH, np.random.default_rng(3), raw_prob=0.3)
    assert x.shape[:2] == pos.shape and x.shape[1] == token_pos.numel() < T
    raw = token_pos >= 0
    assert torch.equal(x[:, raw], emb[:, token_pos[raw]])  # raw slots are the token embeddings themselves
    assert torch.equal(pos[0, raw], token_pos[raw])
    assert bool((pos[0, 1:] >= pos[0, :-1]).all())  # positions never go back
    assert (~raw).any()
    scale = emb.pow(2).mean().sqrt()
    rms = x[:, ~raw].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, float(scale)), rtol=1e-4)  # summaries are embedding-sized
    assert bool(raw[-K:].all())  # the newest block stays raw


def test_all_raw_layout_is_exactly_the_plain_lm_loss_and_summaries_carry_gradient() -> None:
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=256, hidden_size=32)
    ids = windows(2)
    plain = next_token_loss(model, ids)
    all_raw = gist_exposure_loss(model, ids, K, DEPTH, np.random.default_rng(0), raw_prob=1.0 - 1e-12)
    assert torch.allclose(all_raw, plain, atol=1e-5)
    loss = gist_exposure_loss(model, ids, K, DEPTH, np.random.default_rng(0), raw_prob=0.0)
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    only_summarised = sorted(set(ids[:, :K].flatten().tolist()) - set(ids[:, -K:].flatten().tolist()))
    assert (
        only_summarised and grad[only_summarised].abs().sum() > 0
    )  # seen only inside a summary, still learn


def test_module_adds_the_weighted_exposure_term_deterministically() -> None:
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=256, hidden_size=32)
    ids = windows(2)
    base = BaseLMModule(model, block_size=K, depth=DEPTH)
    exposed = BaseLMModule(model, gist_exposure=0.5, block_size=K, depth=DEPTH)
    for m in (base, exposed):
        m.log = lambda *a, **k: None  # noqa: ARG005 - no trainer attached
    with torch.no_grad():
        plain, mixed = base.training_step(ids, 0), exposed.training_step(ids, 0)
        extra = exposed.exposure_loss(ids, 0)
    assert torch.allclose(mixed, plain + 0.5 * extra, atol=1e-5)
    assert torch.allclose(exposed.exposure_loss(ids, 0), extra) and extra > 0


def test_session_layouts_put_summaries_behind_a_raw_present_within_the_budget() -> None:
    torch.manual_seed(0)
    emb = torch.randn(2, T, 8)
    budget = 30
    for seed in range(8):
        gen = np.random.default_rng(seed)
        x, pos, token_pos = gisted_inputs(emb, K, DEPTH, gen, session_share=1.0, session_budget=budget)
        raw = token_pos >= 0
        assert x.shape[1] <= budget and (~raw).any()
        assert bool((pos[0, 1:] >= pos[0, :-1]).all())
        replay = np.random.default_rng(seed)
        replay.random()  # the share draw
        entries = W.session_layout(T // K * K, K, DEPTH, budget, replay)
        expected = [p for e in entries if e.level == 0 for p in range(*e.span(K))]
        assert token_pos[raw].tolist() == expected  # exactly the session WC's raw blocks, in place
    # session_share 0 (the default) draws the random mix exactly as before
    a = gisted_inputs(emb, K, DEPTH, np.random.default_rng(5), raw_prob=0.3)
    b = gisted_inputs(emb, K, DEPTH, np.random.default_rng(5), raw_prob=0.3, session_budget=budget)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_a_gistnet_summarizer_trains_with_the_base_on_the_exposure_loss() -> None:
    """``base_lm.gist_exposure_summary=gistnet``: the summaries are the GistNet's output (a residual-mean GistNet
    starts as the mean summary exactly), and one optimiser step moves both the base and the GistNet."""
    from mchar.core.gistnet import make_gistnet

    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=256, hidden_size=32)
    ids = windows(2)
    rms = float(model.get_input_embeddings().weight.detach().pow(2).mean().sqrt())
    gistnet = make_gistnet(
        "transformer",
        d_model=32,
        block_size=K,
        n_layers=1,
        n_heads=2,
        width=32,
        head="mlp",
        max_level=DEPTH,
        out_scale=rms,
        residual_mean=True,
    )
    mean = BaseLMModule(model, gist_exposure=1.0, block_size=K, depth=DEPTH)
    learnt = BaseLMModule(model, gist_exposure=1.0, block_size=K, depth=DEPTH, summarizer=gistnet)
    with torch.no_grad():
        assert torch.allclose(learnt.exposure_loss(ids, 0), mean.exposure_loss(ids, 0), atol=1e-5)
    learnt.log = lambda *a, **k: None  # noqa: ARG005 - no trainer attached
    opt = torch.optim.AdamW(learnt.configure_optimizers_plain(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in learnt.named_parameters()}
    learnt.training_step(ids, 0).backward()
    opt.step()
    moved = {n for n, p in learnt.named_parameters() if not torch.equal(before[n], p)}
    assert any(n.startswith("summarizer.") for n in moved) and any(n.startswith("model.") for n in moved)
    with torch.no_grad():
        assert not torch.allclose(learnt.exposure_loss(ids, 0), mean.exposure_loss(ids, 0), atol=1e-5)
