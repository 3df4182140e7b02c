"""LensNet module: vectorised pairwise loss, one base forward per batch, correct utilities, gradient coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mchar.compose import compose_config
from mchar.core.lensnet import LensNet
from mchar.errors import MCharError
from mchar.lit import windows as W
from mchar.lit.lens_plan import perturb
from mchar.lit.lensnet_module import LensNetModule, pairwise_bt_loss, stake_agreement
from tests.lit.helpers import (
    DEPTH,
    H,
    K,
    changed,
    featured_lensnet,
    one_step,
    snapshot,
    tiny_base,
    tiny_gistnet,
    tiny_lensnet,
    windows,
)


def _module(lensnet: LensNet | None = None, **kw) -> LensNetModule:
    return LensNetModule(
        tiny_base(),
        tiny_gistnet(),
        lensnet or tiny_lensnet(),
        block_size=K,
        depth=DEPTH,
        budget=24,
        horizon=H,
        candidates=6,
        max_steps=4,
        **kw,
    )


def _naive_bt(s: torch.Tensor, u: torch.Tensor, gap_weighted: bool = True) -> float:
    """The batch-normalised Bradley-Terry loss, one pair at a time."""
    num = den = 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                if u[b, i] > u[b, j]:
                    w = float(u[b, i] - u[b, j]) if gap_weighted else 1.0
                    num += w * float(torch.nn.functional.softplus(-(s[b, i] - s[b, j])))
                    den += w
    return num / den


def test_bt_loss_matches_naive_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    s, u = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert abs(float(pairwise_bt_loss(s, u)) - _naive_bt(s, u)) < 1e-5


def test_bt_loss_per_window_weighs_every_window_alike() -> None:
    """``norm="window"``: each window's weighted pair loss on its own, averaged; scaling one window's utilities
    (a needle's nats against code's hundredths) changes the batch-normalised loss but not this one."""
    g = torch.Generator().manual_seed(1)
    s, u = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    per = [float(pairwise_bt_loss(s[b : b + 1], u[b : b + 1])) for b in range(3)]
    assert abs(float(pairwise_bt_loss(s, u, norm="window")) - sum(per) / 3) < 1e-5
    scaled = u.clone()
    scaled[0] *= 100.0
    assert abs(float(pairwise_bt_loss(s, scaled, norm="window")) - sum(per) / 3) < 1e-5
    assert abs(float(pairwise_bt_loss(s, scaled)) - float(pairwise_bt_loss(s, u))) > 1e-3
    tied = u.clone()
    tied[1] = 0.0  # a window without a ranked pair is left out of the mean, not counted as zero loss
    want = (per[0] + per[2]) / 2
    assert abs(float(pairwise_bt_loss(s, tied, norm="window")) - want) < 1e-5


def test_bt_loss_rank_weights_count_every_ordered_pair_alike() -> None:
    """``weight="rank"``: every pair with u_i > u_j weighs 1, so the loss depends on the utilities' order only
    (a monotone transform of one window's utilities leaves it unchanged; under ``"gap"`` it does not)."""
    g = torch.Generator().manual_seed(2)
    s, u = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert abs(float(pairwise_bt_loss(s, u, weight="rank")) - _naive_bt(s, u, gap_weighted=False)) < 1e-5
    warped = u.clone()
    warped[0] = torch.exp(3 * warped[0])  # same order, other gaps
    for norm in ("batch", "window"):
        same = pairwise_bt_loss(s, warped, norm=norm, weight="rank") - pairwise_bt_loss(
            s, u, norm=norm, weight="rank"
        )
        assert abs(float(same)) < 1e-6
    assert abs(float(pairwise_bt_loss(s, warped) - pairwise_bt_loss(s, u))) > 1e-3


def test_stake_agreement_is_the_gap_weighted_share_of_pairs_ordered_right() -> None:
    g = torch.Generator().manual_seed(3)
    s, u = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    s[0, 1] = s[0, 2]  # a score tie counts half
    got = stake_agreement(s, u)
    for b in range(4):
        num = den = 0.0
        for i in range(6):
            for j in range(6):
                if u[b, i] > u[b, j]:
                    gap = float(u[b, i] - u[b, j])
                    right = 1.0 if s[b, i] > s[b, j] else 0.5 if s[b, i] == s[b, j] else 0.0
                    num, den = num + gap * right, den + gap
        assert float(got[b]) == pytest.approx(num / den, abs=1e-6)
    assert torch.allclose(stake_agreement(u, u), torch.ones(4))
    assert torch.allclose(stake_agreement(-u, u), torch.zeros(4))
    assert torch.allclose(stake_agreement(torch.zeros_like(u), u), torch.full((4,), 0.5))
    assert torch.allclose(
        stake_agreement(torch.exp(2 * s), u), stake_agreement(s, u)
    )  # the scores' order only
    assert torch.isnan(stake_agreement(s[:1], torch.ones(1, 6))).all()  # no gap, nothing at stake


def _step_with_forward_count(m: LensNetModule, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One training step's loss and how many base forwards it ran."""
    calls = []
    h = m.base.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        loss, _ = m.step_loss(ids, 0)
    finally:
        h.remove()
    return loss, len(calls)


def test_one_base_forward_per_batch_and_utilities_match_single_runs() -> None:
    m = _module()
    ids = windows(3)
    loss, forwards = _step_with_forward_count(m, ids)
    assert forwards == 1 and torch.isfinite(loss)
    p = m.prefix(ids)
    targets = ids[:, p : p + H]
    with torch.no_grad():
        tok = m.base.embed(ids[:, : p + H])
        gists = m.gists(tok, p)
        bank = W.source_bank(tok, gists)
        entries, cand = m.sample_step(0, p)
        utils = m.measure_utilities(bank, entries, cand, p, targets)
        offs = W.bank_offsets(p + H, p, K, DEPTH)
        i = int(cand[0])
        base_nll = m.horizon_nll(bank, [(0, *m.slots(entries, offs))], p, targets)
        var_nll = m.horizon_nll(bank, [(0, *m.slots(perturb(entries, i, K), offs))], p, targets)
    sign = 1.0 if entries[i].level > 0 else -1.0
    assert abs(float(utils[0, 0]) - sign * float(base_nll - var_nll)) < 1e-5
    assert sum(e.cost(K) for e in entries) <= 24


def test_one_step_changes_every_lensnet_param_only() -> None:
    m = _module()
    before = snapshot(m)
    one_step(m, windows(4), step=0)
    stuck, moved = changed(m, before)
    assert not stuck and not moved, (sorted(stuck), sorted(moved))
    assert any(p.requires_grad for p in m.lensnet.parameters())
    assert not any(p.requires_grad for p in m.gistnet.parameters())


def test_regression_loss_and_validation_metrics() -> None:
    m = _module(loss="regression")
    assert torch.isfinite(m.step_loss(windows(2), 1)[0])
    out = m.evaluate_batch(windows(2), 0)
    for key in (
        "spearman",
        "lens_loss",
        "alloc_nll/lensnet",
        "alloc_nll/recency",
        "alloc_nll/similarity",
        "alloc_nll/random",
        "alloc_nll/gists_only",
    ):
        assert key in out, key
    assert torch.isfinite(out["alloc_nll/recency"]).all()


def test_checkpoint_state_and_export(tmp_path) -> None:
    m = _module()
    state = m.state_dict()
    m.on_save_checkpoint(ckpt := {"state_dict": state})
    keys = set(ckpt["state_dict"])
    assert {f"lensnet.{k}" for k in m.lensnet.state_dict()} <= keys
    assert not any(k.startswith("base.") for k in keys)
    m.on_load_checkpoint(ckpt)
    m.load_state_dict(ckpt["state_dict"])  # strict: the base is put back from the live model
    m.export(tmp_path / "lens")
    net = LensNet.from_pretrained(tmp_path / "lens")
    args = (
        torch.randn(2, 5, 32),
        torch.zeros(2, 5, dtype=torch.long),
        torch.full((2, 5), 4),
        torch.arange(5).repeat(2, 1),
    )
    assert torch.allclose(net(*args), m.lensnet(*args))


def test_random_fill_wcs_are_legal_full_and_reach_far_back() -> None:
    import numpy as np

    from mchar.lit.windows import random_fill_wc

    shape = W.WindowShape(4, 2, 160)
    far_raw = 0
    for seed in range(20):
        wc = random_fill_wc(shape, 40, np.random.default_rng(seed))
        wc.validate(shape)
        assert 40 - 3 <= wc.cost <= 40  # no further gist expand (K - 1 = 3 slots) fits
        far_raw += any(e.level == 0 and e.index < 20 for e in wc.entries)
    assert far_raw >= 5  # a recency-first WC never has a raw block in the older half


def test_lookahead_allocation_and_random_fill_steps_run() -> None:
    m = _module(random_fill=1.0, lookahead=True)
    assert torch.isfinite(m.step_loss(windows(2), 0)[0])
    out = m.evaluate_batch(windows(2), 0)
    assert (
        torch.isfinite(out["alloc_nll/lensnet"]).all() and torch.isfinite(out["alloc_nll/similarity"]).all()
    )
    # both kinds of WC are ranked on every validation batch; "spearman" pools them
    assert out["spearman_recent"].shape == out["spearman_fill"].shape == (2,)
    assert torch.equal(out["spearman"], torch.cat([out["spearman_recent"], out["spearman_fill"]]))
    assert "spearman_fill" not in _module().evaluate_batch(windows(2), 0)


def test_more_wc_draws_add_rankings_and_keep_the_first() -> None:
    """``val_wc_draws=2``: every kind's rank metrics hold a second WC's windows after the first draw's, which is
    the one-draw validation's own (same nets, same batch)."""
    one = _module(random_fill=1.0)
    two = _module(random_fill=1.0, val_wc_draws=2)
    two.load_state_dict(one.state_dict())
    a, b = one.evaluate_batch(windows(2), 0), two.evaluate_batch(windows(2), 0)
    for name in ("spearman_recent", "spearman_fill", "spearman_expected", "utility_split_half"):
        assert b[name].shape[0] == 2 * a[name].shape[0], name
    for kind in ("recent", "fill"):
        torch.testing.assert_close(b[f"spearman_{kind}"][:2], a[f"spearman_{kind}"], equal_nan=True)
        assert b[f"lens_loss_{kind}"][0] == a[f"lens_loss_{kind}"][0]
    assert not torch.equal(b["spearman_recent"][2:], a["spearman_recent"])  # another WC, other candidates
    torch.testing.assert_close(
        b["alloc_nll/lensnet"], a["alloc_nll/lensnet"]
    )  # allocation is not drawn again
    with pytest.raises(ValueError, match="lensnet.val_wc_draws must be >= 1"):
        _module(val_wc_draws=0)


def test_validation_allocation_starts_where_a_session_does() -> None:
    from mchar.core.allocator import initial_context

    ids = windows(2)
    m = _module(alloc_start="recent", protect_tokens=2 * K, alloc_edits=1, alloc_rounds=1)
    tok = m.base.embed(ids)
    prefix = m.prefix(ids)
    gists = m.gists(tok, prefix)
    gen = np.random.default_rng(0)
    start = list(initial_context(m.shape(prefix), m.budget).entries)
    # recency scores agree with the recency-first start: nothing to change
    assert [list(w.entries) for w in m.allocate("recency", 2, tok, gists, prefix, gen)] == [start, start]
    for wc in m.allocate("random", 2, tok, gists, prefix, gen):
        assert wc.cost <= m.budget
        changed_entries = set(wc.entries) ^ set(start)
        assert len(changed_entries) <= K + 1  # at most one edit (alloc_edits=1, one round)
        protected = [e for e in start if e.level == 0 and e.end(K) > prefix - 2 * K]
        assert all(e in wc.entries for e in protected)  # the protected tail is never collapsed
    coarse = _module(alloc_start="coarsest")
    cover = coarse.allocate("gists_only", 1, tok, gists, prefix, gen)[0]
    assert all(e.level > 0 for e in cover.entries)


def test_unknown_alloc_start_is_refused() -> None:
    with pytest.raises(ValueError, match="alloc_start"):
        _module(alloc_start="middle")


def test_on_policy_steps_train_on_the_allocators_own_wc() -> None:
    """``on_policy=1``: every window's training WC is what the allocator builds for it from LensNet's current scores
    (legal, within the budget), its candidates are drawn from it, and the step still trains every LensNet
    parameter."""
    ids = windows(2)
    m = _module(on_policy=1.0)
    prefix = m.prefix(ids)
    tok = m.base.embed(ids[:, : prefix + H])
    gists = m.gists(tok, prefix)
    gen = np.random.default_rng(W.step_seed(0, 3, 17))
    gen.random()  # the on/off draw lens_loss makes first
    plan = m.on_policy_plan(tok, gists, prefix, gen)
    want = m.allocate("lensnet", 2, tok, gists, prefix, np.random.default_rng(0))
    for entries, cand, wc in zip(plan.entries, plan.cand, want, strict=True):
        assert [(e.level, e.index) for e in entries] == [(e.level, e.index) for e in wc.entries]
        assert wc.cost <= 24 and len(cand) == min(6, len(entries)) and (np.diff(cand) > 0).all()
    before = snapshot(m)
    one_step(m, ids, step=3)
    stuck, moved = changed(m, before)
    assert not stuck and not moved, (sorted(stuck), sorted(moved))


@pytest.mark.parametrize(
    ("lexical_tokens", "follow", "sharpen"),
    [(0, 0, {}), (K, 0, {}), (K, 1, {}), (K, 1, {"idf_power": 3.0, "max_df": 2})],
)
def test_the_session_policy_feeds_lensnet_exactly_what_training_fed_it(
    lexical_tokens: int, follow: int, sharpen: dict
) -> None:
    """Train/serve parity: for the same WC over the same tokens, the ``lensnet`` policy (tree-built entry vectors,
    distances, tail; the tree's incremental lexical index) gives the scores the training module's batched features
    give (the windows' lexicon), up to the policy's standardisation. A mismatch here would make every validation
    number say nothing about evaluation."""
    from mchar.core.policies import LensNetPolicy, standardise
    from mchar.core.tree import MegaContextTree
    from mchar.lit.windows import random_fill_wc, random_wc

    lens = featured_lensnet(
        seed=3,
        query_tokens=4,
        lexical_tokens=lexical_tokens,
        lexical_prior=2.0 if lexical_tokens else 0.0,
        lexical_follow=follow,
        **{f"lexical_{k}": v for k, v in sharpen.items()},
    )
    m = LensNetModule(tiny_base(), tiny_gistnet(), lens, block_size=K, depth=DEPTH, budget=24, horizon=H)
    ids = windows(1, seed=5)
    prefix = m.prefix(ids)
    with torch.no_grad():
        tok = m.base.embed(ids[:, :prefix])
        gists = m.gists(tok, prefix)
        tree = MegaContextTree.in_memory(K, DEPTH, 32, m.base.embed, lambda x, level: m.gistnet(x, level))
        tree.ingest(ids[0, :prefix])
        policy = LensNetPolicy(lens)
        for seed in range(4):
            gen = np.random.default_rng(seed)
            make = random_fill_wc if seed % 2 else (lambda s, b, g: random_wc(s, b, g, 3))
            wc = make(m.shape(prefix), 24, gen)
            want, _ = m.lens_scores([list(wc.entries)], [0], tok, gists, prefix, ids)
            got = policy.scores(wc, tree)
            assert torch.allclose(got, standardise(want[0]), atol=1e-4), (seed, got, standardise(want[0]))
            if lexical_tokens:  # the feature is live: some entries hold the query's tokens, some do not
                lex = m.lexical_scores([list(wc.entries)], [0], ids, prefix, K, 1, follow, **sharpen)[0]
                assert lex.max() > 0 and lex.min() == 0
                assert torch.allclose(policy.lexical.scores(wc, tree), standardise(lex), atol=1e-5)


def test_validation_puts_lensnet_spearman_in_scale_with_references_and_a_split_half() -> None:
    """The hand-made scorers' Spearman and the utilities' odd/even split-half agreement are measured on the same
    candidates as LensNet's: recomputed here from the per-token utilities and entry ends."""
    from torchmetrics.functional import spearman_corrcoef

    m = _module()
    ids = windows(3)
    out = m.evaluate_batch(ids, 0)
    p = m.prefix(ids)
    with torch.no_grad():
        tok = m.base.embed(ids[:, : p + H])
        gists = m.gists(tok, p)
        bank = W.source_bank(tok, gists)
        entries, cand = m.sample_step(-1, p, kind="recent")
        per_token = m.measure_utilities(bank, entries, cand, p, ids[:, p : p + H], per_token=True)
    assert per_token.shape == (3, len(cand), H)
    utils = per_token.mean(-1)
    assert torch.allclose(utils, m.measure_utilities(bank, entries, cand, p, ids[:, p : p + H]))
    ends = torch.tensor([float(entries[int(i)].end(K)) for i in cand])
    for w in range(3):
        want = spearman_corrcoef(ends, utils[w])
        assert abs(float(out["spearman/recency"][w]) - float(want)) < 1e-5
        half = spearman_corrcoef(per_token[w, :, 0::2].mean(-1), per_token[w, :, 1::2].mean(-1))
        assert abs(float(out["utility_split_half"][w]) - float(half)) < 1e-5
    assert out["spearman/similarity"].shape == out["spearman"].shape == (3,)


def _teacher_step(utility: str) -> tuple[LensNetModule, torch.Tensor, tuple, list, np.ndarray, torch.Tensor]:
    """A module training on ``utility`` after one step (checked: the teacher and the variants, two base forwards),
    with its batch, the batch's window state and step 0's WC, candidates and teacher logits."""
    m = _module(utility=utility)
    ids = windows(3)
    loss, forwards = _step_with_forward_count(m, ids)
    assert forwards == 2 and torch.isfinite(loss)
    state = m.window_state(ids)
    with torch.no_grad():
        entries, cand = m.sample_step(0, state[0])
        teacher = m.teacher(ids, state[0])
    return m, ids, state, entries, cand, teacher


def test_expected_utilities_are_kl_gains_to_the_full_context_model() -> None:
    """``utility=expected``: a training step runs the teacher (raw window) and the variants (two base forwards);
    each utility is KL(teacher || WC) - KL(teacher || variant), recomputed here from single rows, and its mean
    over the horizon tokens equals the sampled gain's expectation under the teacher (NLL gains weighted by the
    teacher's probabilities)."""
    m, _, (p, targets, _, _, bank), entries, cand, teacher = _teacher_step("expected")
    with torch.no_grad():
        utils = m.measure_utilities(bank, entries, cand, p, targets, teacher=teacher)
        sampled = m.measure_utilities(bank, entries, cand, p, targets)
        offs = W.bank_offsets(p + H, p, K, DEPTH)
        i = int(cand[1])
        logits = []
        for layout in (entries, perturb(entries, i, K)):
            rows = W.build_rows([(2, *m.slots(layout, offs))], p, H, bank.device)
            logits.append(W.horizon_logits(m.base, W.gather_rows(bank, rows), rows, H))
    sign = 1.0 if entries[i].level > 0 else -1.0
    kl = [W.token_kl(teacher[2:3], lg).mean() for lg in logits]
    assert abs(float(utils[2, 1]) - sign * float(kl[0] - kl[1])) < 1e-4
    # the same gain as an expectation of per-token NLL gains over the teacher's next-token distribution
    t = torch.softmax(teacher[2], -1)
    gains = torch.log_softmax(logits[1][0], -1) - torch.log_softmax(logits[0][0], -1)  # log p_var - log p_wc
    assert abs(float(utils[2, 1]) - sign * float((t * gains).sum(-1).mean())) < 1e-4
    assert not torch.allclose(utils, sampled)


def test_mixed_utilities_train_on_the_mean_of_both_measurements() -> None:
    """``utility=mixed``: one teacher + one variant forward per step, and the target is the mean of the sampled and
    the expected gains of the same candidates, and the step's loss is the pairwise loss on that mean."""
    m, ids, (p, targets, tok, gists, bank), entries, cand, teacher = _teacher_step("mixed")
    with torch.no_grad():
        sampled = m.measure_utilities(bank, entries, cand, p, targets)
        expected = m.measure_utilities(bank, entries, cand, p, targets, teacher=teacher)
        mixed = m.target_utilities({"sampled": sampled, "expected": expected})
        torch.testing.assert_close(mixed, (sampled + expected) / 2)
        scores, _ = m.lens_scores([entries] * 3, range(3), tok, gists, p)
        plan = m.plan_for(entries, cand, p, bank)
        want = pairwise_bt_loss(scores.gather(1, plan.cand_index), mixed, norm=m.hparams.pair_norm)
        torch.testing.assert_close(m.lens_loss(ids, 0)[0], want)


def test_validation_reports_rank_agreement_with_both_utility_measurements() -> None:
    for utility in ("sampled", "expected", "mixed"):
        out = _module(utility=utility).evaluate_batch(windows(2), 0)
        for key in (
            "spearman",
            "spearman_expected",
            "utility_split_half",
            "utility_split_half_expected",
            "spearman/recency",
            "spearman_expected/recency",
            "spearman_expected/similarity",
        ):
            assert out[key].shape == (2,), key
        assert not torch.allclose(out["utility_split_half"], out["utility_split_half_expected"])


def test_unknown_utility_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="lensnet.utility"):
        _module(utility="oracle")
    with pytest.raises(ValueError, match="lensnet.pair_norm"):
        _module(pair_norm="pair")
    with pytest.raises(ValueError, match="lensnet.pair_weight"):
        _module(pair_weight="uniform")
    with pytest.raises(ValueError, match="lensnet.teacher_temperature"):
        _module(utility="expected", teacher_temperature=0.0)
    with pytest.raises(ValueError, match="lensnet.teacher_gate"):
        _module(utility="expected", teacher_gate=1.0)


def test_a_sharpened_teacher_is_the_expected_gain_under_logits_over_t() -> None:
    """``teacher_temperature``: the training target is the expected gain against softmax(teacher / T); T = 1 is the
    plain expected measurement, and the sharper the teacher, the closer the target to its argmax token's gain."""
    m, ids, (p, targets, tok, gists, bank), entries, cand, teacher = _teacher_step("expected")
    with torch.no_grad():
        plan = m.plan_for(entries, cand, p, bank)
        logits = m.variant_logits(bank, plan)
        expected = m.utilities_from(logits, plan, targets, teacher)
        torch.testing.assert_close(m.training_target(logits, plan, targets, teacher), expected)
        m.hparams.teacher_temperature = 0.5
        torch.testing.assert_close(
            m.training_target(logits, plan, targets, teacher),
            m.utilities_from(logits, plan, targets, teacher / 0.5),
        )
        m.hparams.teacher_temperature = 1e-4  # ~ one-hot on the teacher's argmax: the NLL gain of that token
        argmax = m.utilities_from(logits, plan, teacher.argmax(-1), None)
        torch.testing.assert_close(
            m.training_target(logits, plan, targets, teacher), argmax, atol=1e-3, rtol=1e-3
        )


def test_a_gated_teacher_keeps_the_sampled_gain_where_its_argmax_misses_the_token() -> None:
    """``teacher_gate``: each horizon token takes the expected gain where the teacher's argmax is the token that
    came, the sampled gain where it is not (a teacher answering with a distractor's value must not set the target)."""
    m, ids, (p, targets, tok, gists, bank), entries, cand, teacher = _teacher_step("expected")
    right = (
        teacher.clone()
    )  # the teacher made right (argmax = the true token, still a soft distribution) on even tokens
    top = right.max(-1).values
    right[:, ::2].scatter_(-1, targets[:, ::2, None], (top[:, ::2] + 0.5)[..., None])
    gate = right.argmax(-1) == targets
    assert bool(gate[:, ::2].all()) and not bool(gate.all())
    with torch.no_grad():
        plan = m.plan_for(entries, cand, p, bank)
        logits = m.variant_logits(bank, plan)
        expected = m.utilities_from(logits, plan, targets, right, per_token=True)
        sampled = m.utilities_from(logits, plan, targets, per_token=True)
        m.hparams.teacher_gate = 0.0
        gated = m.training_target(logits, plan, targets, right)
        torch.testing.assert_close(gated, torch.where(gate[:, None], expected, sampled).mean(-1))
        assert not torch.allclose(gated, expected.mean(-1)) and not torch.allclose(gated, sampled.mean(-1))
        # validation's already-taken (ungated) expected measurement is not reused for a gated target
        known = {"expected": expected.mean(-1), "sampled": sampled.mean(-1)}
        torch.testing.assert_close(m.training_target(logits, plan, targets, right, known), gated)
        # a threshold keeps the expected gain where the teacher misses without conviction
        top = torch.softmax(right, -1).max(-1).values
        g = float(top[~gate].median())
        m.hparams.teacher_gate = g
        keep = gate | (top < g)
        assert bool(keep.any()) and bool((keep & ~gate).any()) and not bool(keep.all())
        torch.testing.assert_close(
            m.training_target(logits, plan, targets, right),
            torch.where(keep[:, None], expected, sampled).mean(-1),
        )


def test_a_lexical_lensnet_trains_validates_and_allocates_from_token_ids() -> None:
    """With ``lexical_tokens`` the lexical score reaches LensNet on every path that scores with it (training steps,
    on-policy allocation, validation), its prior weight trains like every other parameter, validation reports the
    ``lexical`` baseline next to LensNet's, and scoring without the windows' ids fails with a message naming them."""
    m = LensNetModule(
        tiny_base(), tiny_gistnet(), featured_lensnet(), block_size=K, depth=DEPTH, budget=24, horizon=H,
        candidates=6, on_policy=0.5,
    )  # fmt: skip
    before = snapshot(m)
    for step in range(2):  # one on-policy step (allocator WC from LensNet's scores), one planner step
        one_step(m, windows(2), step=step)
    stuck, moved = changed(m, before)
    assert not stuck and not moved, (sorted(stuck), sorted(moved))
    out = m.evaluate_batch(windows(2), 0)
    for key in ("alloc_nll/lexical", "alloc_nll/lensnet", "spearman/lexical"):
        assert torch.isfinite(out[key]).all(), key
    ids = windows(2)
    p = m.prefix(ids)
    tok = m.base.embed(ids[:, :p])
    with pytest.raises(ValueError, match="token ids"):
        m.allocate("lensnet", 2, tok, m.gists(tok, p), p, np.random.default_rng(0))


def test_settle_steps_train_on_the_wc_a_session_settles_on_before_an_answer() -> None:
    """``settle_states=1``: every window's training WC is the question-time settle's for that window (the coarsest
    cover refocused on LensNet plus the question's lexical score): the blocks holding its question's rare tokens are
    opened raw, the WC stays within the budget, and the step trains every LensNet parameter and nothing else."""
    ids = windows(2)
    rare = torch.arange(250, 250 + K)
    ids[ids >= 250] = 0
    m = _module(settle_states=1.0, settle_weight=100.0)
    prefix = m.prefix(ids)
    for w, key in enumerate((2, 7)):
        ids[w, key * K : (key + 1) * K] = rare  # block ``key`` of window ``w`` holds the key ...
        ids[w, prefix - K : prefix] = rare  # ... the question (the prefix's last block) asks for it
    tok = m.base.embed(ids[:, : prefix + H])
    gists = m.gists(tok, prefix)
    plan = m.settle_plan(tok, gists, prefix, np.random.default_rng(0), ids)
    for key, entries, cand in zip((2, 7), plan.entries, plan.cand, strict=True):
        raw = {e.index for e in entries if e.level == 0}
        # the key's block and its reach (one block back, one ahead) tie on the question's tokens: the budget opens
        # some of them raw and none of the blocks between the key's reach and the question
        reach = {key - 1, key, key + 1}
        assert raw & reach and not raw & (set(range(1, 12)) - reach), [(e.level, e.index) for e in entries]
        assert sum(K if e.level == 0 else 1 for e in entries) <= 24 and len(cand) == min(6, len(entries))
    before = snapshot(m)
    one_step(m, ids, step=3)
    stuck, moved = changed(m, before)
    assert not stuck and not moved, (sorted(stuck), sorted(moved))
    with pytest.raises(ValueError, match="settle_states must be in"):
        _module(settle_states=1.5)


def test_validation_draws_follow_val_seed_not_the_training_seed() -> None:
    """Two training seeds rank the same validation WCs and candidates (``val_seed``), so their Spearmans are paired;
    training steps still follow the seed, and another ``val_seed`` draws other validation WCs."""
    a = _module(random_fill=0.5, seed=0)
    b = _module(random_fill=0.5, seed=1)
    c = _module(random_fill=0.5, seed=0, val_seed=1)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    ids = windows(2)
    prefix = W.prefix_len(ids.shape[1], H, K)
    ra, rb, rc = (m.evaluate_batch(ids, 0) for m in (a, b, c))
    for name in ("spearman_recent", "spearman_fill", "spearman/recency", "alloc_nll/random"):
        torch.testing.assert_close(ra[name], rb[name], equal_nan=True)
    draws = [
        [m.validation_wc(0, prefix, kind, d) for kind in ("recent", "fill") for d in range(2)] for m in (a, c)
    ]
    assert any(x[0] != y[0] or not np.array_equal(x[1], y[1]) for x, y in zip(*draws, strict=True))
    steps = [[m.sample_step(s, prefix) for s in range(4)] for m in (a, b)]
    assert any(x[0] != y[0] or not np.array_equal(x[1], y[1]) for x, y in zip(*steps, strict=True))


def test_the_prior_path_learns_at_its_own_rate() -> None:
    """``prior_lr_scale``: the linear prior path is its own optimizer group at that multiple of ``lr`` (Adam's first
    step moves each weight by about its group's rate), every other LensNet weight as before."""

    def first_step(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        m = _module(featured_lensnet(), warmup_steps=0, prior_lr_scale=scale)
        groups = m.configure_optimizers()["optimizer"].param_groups
        names = ["lensnet", "lensnet_prior"] if scale != 1 else ["lensnet"]
        assert [g["name"] for g in groups] == names
        assert groups[-1]["lr"] == pytest.approx(scale * groups[0]["lr"])
        before = snapshot(m)
        one_step(m, windows(4), step=0)
        prior = (m.lensnet.prior.weight - before["lensnet.prior.weight"]).abs().max()
        rest = (m.lensnet.score[-1].weight - before["lensnet.score.2.weight"]).abs().max()
        return prior, rest

    prior1, rest1 = first_step(1.0)
    prior10, rest10 = first_step(10.0)
    assert prior10 > 5 * prior1 > 0
    torch.testing.assert_close(rest10, rest1)
    with pytest.raises(MCharError, match="lensnet.prior_lr_scale"):
        compose_config(["+experiment=smoke", "lensnet.prior_lr_scale=0"])
