"""LensNet training on measured counterfactual utilities (GistNet fixed).

Per step: every window of the batch gets the same budget-respecting WC (``initial_context`` at the budget plus a
few random legal edits, seeded by the step; on-policy and settle steps give each window the WC the allocator or the
settle builds for it); C candidate entries are perturbed one at a time (a gist expanded
into its children, a raw block collapsed into its LOD1 gist); the base scores the H horizon tokens for the base WC
and every variant of every window in ONE forward (rows stacked along the batch, left-padded, masked).

Utility of an entry = horizon-NLL gain of its finer version: ``NLL(WC) - NLL(WC with it expanded)`` for a gist,
``NLL(WC with it collapsed) - NLL(WC)`` for a raw block. Both edits cost the same K-1 slots, so the values are
directly comparable and "higher = keep/expand, lower = collapse first" matches the allocator's convention
(upstream's collapse label had the opposite sign, so the blocks that hurt most to collapse were collapsed first).
Two measurements of that gain (``utility``): ``sampled`` scores the true horizon tokens; ``expected`` takes each
token's NLL gain in expectation under the full-context model's next-token distribution (``KL(teacher || WC) -
KL(teacher || variant)``, one more base forward on the raw window): the Rao-Blackwellised version of the same gain,
without the noise of which token happened to come next; ``mixed`` trains on their mean. Validation reports the rank
agreement with both measurements.

Loss: Bradley–Terry over all candidate pairs of a window (broadcast ``[B, C, C]``, weighted by |Δutility|) or
MSE regression; no Python loop over pairs. Validation: Spearman between scores and utilities, and the horizon NLL
of allocator-built WCs (greedy fill from the coarsest cover) driven by LensNet vs recency / similarity / random /
gists_only scores at the same budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import spearman_corrcoef

from mchar.config import LENSNET_PAIR_NORMS, LENSNET_PAIR_WEIGHTS, LENSNET_UTILITIES
from mchar.core.allocator import FocusAllocator, initial_context
from mchar.core.entries import Entry
from mchar.core.lensnet import standardise_rows
from mchar.core.lexical import LexicalInput, WindowLexicon
from mchar.core.lookahead import CONTENT_POLICIES, lookahead_view, max_by_owner
from mchar.core.policies import blend_scores
from mchar.core.working_context import WorkingContext
from mchar.lit import windows as W
from mchar.lit.base_lm import warmup_cosine
from mchar.lit.clipping import ShardedNormClipping
from mchar.lit.gistnet_module import FrozenBaseCheckpointMixin, MultiSetValidation, metric_sets
from mchar.lit.lens_plan import LensPlan, LensPlanner
from mchar.lit.trainer import is_logging_step

ALLOC_POLICIES = ("lensnet", "recency", "sink_recent", "similarity", "lexical", "random", "gists_only")
# hand-made scorers whose rank agreement with the measured utilities validation reports next to LensNet's
RANK_REFERENCES = ("recency", "similarity", "lexical")
UTILITIES, PAIR_NORMS, PAIR_WEIGHTS = LENSNET_UTILITIES, LENSNET_PAIR_NORMS, LENSNET_PAIR_WEIGHTS
MEASUREMENTS = ("sampled", "expected")  # what validation ranks against; ``mixed`` is their mean


def per_window_spearman(scores: torch.Tensor, utils: torch.Tensor) -> torch.Tensor:
    """Spearman of each row of ``[B, C]`` scores against the same row of utilities: ``[B]``."""
    return spearman_corrcoef(scores.T.float(), utils.T.float()).reshape(-1)


def stake_agreement(scores: torch.Tensor, utils: torch.Tensor) -> torch.Tensor:
    """Each row's share of the utility at stake that ``scores`` order correctly: over the pairs of ``[B, C]``
    candidates, sum |u_i - u_j| where the scores order them as the utilities do (a score tie counts half), divided
    by sum |u_i - u_j|; ``[B]``, 0.5 = chance, nan for a row without a gap. Where Spearman counts every pair alike,
    so near-ties (a far code block's hundredths, noise) weigh as much as a needle, this weighs a pair by what
    ordering it wrongly costs: the Bradley-Terry training loss's own weighting, as an accuracy."""
    du = utils[:, :, None] - utils[:, None, :]
    ds = scores[:, :, None] - scores[:, None, :]
    gap = du.clamp_min(0.0).double()
    right = (ds > 0).double() + 0.5 * (ds == 0).double()
    total = gap.sum((1, 2))
    share = (gap * right).sum((1, 2)) / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan"))).float()


def pairwise_bt_loss(
    scores: torch.Tensor,
    utils: torch.Tensor,
    mask: torch.Tensor | None = None,
    norm: str = "batch",
    weight: str = "gap",
) -> torch.Tensor:
    """Bradley–Terry over all pairs (i better than j); ``[B, C]`` inputs.

    ``weight="gap"`` weights a pair by |u_i - u_j| (large gains decide); ``"rank"`` weights every ordered pair 1, the
    smooth surrogate of the rank agreement validation reports (a near-tie's order is a coin flip, so it adds noise,
    not bias). ``norm="batch"`` divides by the batch's total weight, so windows whose utilities are large (a
    retrieval needle: nats) outweigh those where they are small (code: hundredths); ``"window"`` normalises each
    window's pairs on their own and averages the windows, so every window's ranking counts the same."""
    du = utils[:, :, None] - utils[:, None, :]
    ds = scores[:, :, None] - scores[:, None, :]
    w = du.clamp_min(0.0) if weight == "gap" else (du > 0).to(du.dtype)
    if mask is not None:
        w = w * (mask[:, :, None] & mask[:, None, :])
    if norm == "window":
        total = w.sum((1, 2))
        per_window = (w * F.softplus(-ds)).sum((1, 2)) / total.clamp_min(1e-8)
        ranked = total > 0
        return per_window[ranked].sum() / ranked.sum().clamp_min(1)
    return (w * F.softplus(-ds)).sum() / w.sum().clamp_min(1e-8)


def regression_loss(
    scores: torch.Tensor, utils: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    err = (scores - utils).pow(2)
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp_min(1)


class LensNetModule(MultiSetValidation, FrozenBaseCheckpointMixin, ShardedNormClipping, L.LightningModule):
    """Trains ``lensnet`` to rank WC entries by their measured counterfactual utility."""

    def __init__(
        self,
        base: nn.Module,
        gistnet: nn.Module,
        lensnet: nn.Module,
        *,
        block_size: int,
        depth: int,
        budget: int,
        horizon: int,
        candidates: int = 16,
        loss: str = "bradley_terry",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        max_steps: int = 200,
        warmup_steps: int = 10,
        random_edits: int = 3,
        position_mode: str = "centre",
        alloc_rounds: int = 16,
        alloc_start: str = "recent",
        alloc_edits: int = 0,
        protect_tokens: int = 0,
        random_fill: float = 0.0,
        on_policy: float = 0.0,
        settle_states: float = 0.0,
        settle_weight: float = 4.0,
        settle_rounds: int = 4,
        settle_follow: int = 1,
        settle_idf_power: float = 3.0,
        settle_max_df: int | None = 4,
        lookahead: bool = False,
        seed: int = 0,
        val_seed: int = 0,
        prior_lr_scale: float = 1.0,
        utility: str = "sampled",
        pair_norm: str = "batch",
        pair_weight: str = "gap",
        val_wc_draws: int = 1,
        teacher_temperature: float = 1.0,
        teacher_gate: float | None = None,
        train_gistnet: bool = False,
        val_sets: Sequence[str] = ("val",),
    ) -> None:
        super().__init__()
        if val_wc_draws < 1:
            raise ValueError(f"lensnet.val_wc_draws must be >= 1, got {val_wc_draws}")
        if alloc_start not in ("recent", "coarsest"):
            raise ValueError(f"lensnet.alloc_start must be 'recent' or 'coarsest', got {alloc_start!r}")
        if utility not in UTILITIES:
            raise ValueError(f"lensnet.utility must be one of {UTILITIES}, got {utility!r}")
        if not teacher_temperature > 0:
            raise ValueError(f"lensnet.teacher_temperature must be > 0, got {teacher_temperature}")
        if teacher_gate is not None and not 0.0 <= teacher_gate < 1.0:
            raise ValueError(f"lensnet.teacher_gate must be null or in [0, 1), got {teacher_gate}")
        if not 0.0 <= settle_states <= 1.0:
            raise ValueError(f"lensnet.settle_states must be in [0, 1], got {settle_states}")
        if pair_norm not in PAIR_NORMS:
            raise ValueError(f"lensnet.pair_norm must be one of {PAIR_NORMS}, got {pair_norm!r}")
        if pair_weight not in PAIR_WEIGHTS:
            raise ValueError(f"lensnet.pair_weight must be one of {PAIR_WEIGHTS}, got {pair_weight!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.gistnet = gistnet
        if not train_gistnet:
            self.gistnet.requires_grad_(False)
        self.lensnet = lensnet
        self.save_hyperparameters(ignore=["base", "gistnet", "lensnet"])
        self.k, self.depth, self.horizon, self.budget = block_size, depth, horizon, budget
        self.planner = LensPlanner.of(self.hparams)
        # validation WCs, candidates and reference draws come from ``val_seed``: seed replicates rank the same ones
        self.val_planner = replace(self.planner, seed=val_seed)
        names = ["spearman", "lens_loss", "teacher_nll"] + [f"alloc_nll/{p}" for p in ALLOC_POLICIES]
        names += [f"{m}_{kind}" for m in ("spearman", "lens_loss") for kind in ("recent", "fill")]
        names += [f"spearman/{p}" for p in RANK_REFERENCES] + ["utility_split_half"]
        names += [f"{m}_expected" for m in ("spearman", "utility_split_half")] + [
            f"spearman_expected/{p}" for p in RANK_REFERENCES
        ]
        self.val_sets = tuple(val_sets)
        self.val_metrics = metric_sets(self.val_sets, names, nan_strategy="ignore")
        self.timings: dict[str, list[float]] = {}
        self.profile = False

    # ------------------------------------------------------------------ helpers
    def _tick(self, name: str, t0: float) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the phase's kernels, not just their launches
        t = time.perf_counter()
        if self.profile:
            self.timings.setdefault(name, []).append(t - t0)
        return t

    def prefix(self, ids: torch.Tensor) -> int:
        return W.prefix_len(ids.shape[1], self.horizon, self.k)

    def shape(self, prefix: int) -> W.WindowShape:
        return W.WindowShape(self.k, self.depth, prefix)

    def gists(self, tok: torch.Tensor, prefix: int, grad: bool = False) -> list[torch.Tensor]:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return W.build_gists(self.gistnet, tok[:, :prefix], self.k, self.depth)

    @torch.no_grad()
    def window_state(
        self, ids: torch.Tensor
    ) -> tuple[int, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """What every utility measurement of a batch starts from: (prefix length, horizon targets ``[B, H]``, token
        embeddings, the prefix's gists per level, the bank of token embeddings + gists the WC rows gather from)."""
        prefix = self.prefix(ids)
        tok = self.base.embed(ids[:, : prefix + self.horizon])
        gists = self.gists(tok, prefix)
        return prefix, ids[:, prefix : prefix + self.horizon], tok, gists, W.source_bank(tok, gists)

    def horizon_nll(
        self, bank: torch.Tensor, rows_spec: list, prefix: int, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean horizon NLL per row (``targets [B, H]`` indexed by each row's window)."""
        rows = W.build_rows(rows_spec, prefix, self.horizon, bank.device)
        logits = W.horizon_logits(self.base, W.gather_rows(bank, rows), rows, self.horizon)
        return W.token_nll(logits, targets[rows.batch]).mean(1)

    def slots(self, entries: Sequence[Entry], offs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return W.prefix_slots(entries, self.k, offs, self.hparams.position_mode)

    def lexical_scores(
        self,
        entries_per_row: Sequence[Sequence[Entry]],
        rows_batch: Sequence[int],
        ids: torch.Tensor | None,
        prefix: int,
        query_tokens: int,
        lookback: int,
        follow: int = 0,
        idf_power: float = 1.0,
        max_df: int | None = None,
    ) -> torch.Tensor:
        """``[R, W]`` the ``lexical`` policy's raw scores of each row's entries (padding 0) in its window ``ids``: each
        span widened by ``lookback`` blocks before it and ``follow`` after it (within the window's complete blocks);
        ``idf_power`` / ``max_df`` sharpen it as the settle's scorer does."""
        if ids is None:
            raise ValueError("lexical match scores need the windows' token ids (ids=)")
        width = max(len(e) for e in entries_per_row)
        spans = np.zeros((2, len(entries_per_row), width), dtype=np.int64)
        # a training step scores one entry list for every window: build its spans once
        done: dict[int, int] = {}
        for i, ents in enumerate(entries_per_row):
            if id(ents) in done:
                spans[:, i] = spans[:, done[id(ents)]]
                continue
            done[id(ents)] = i
            n = len(ents)
            starts = np.fromiter((e.start(self.k) for e in ents), np.int64, count=n) // self.k
            spans[0, i, :n] = np.maximum(starts - lookback, 0)
            ends = np.fromiter((e.end(self.k) for e in ents), np.int64, count=n) // self.k
            spans[1, i, :n] = np.minimum(ends + follow, prefix // self.k)
        lexicon = WindowLexicon.of(ids, self.k, prefix, query_tokens, idf_power, max_df)
        dev = lexicon.cum.device
        bi = torch.as_tensor(list(rows_batch), device=dev)
        starts, ends = torch.from_numpy(spans).to(dev)
        return lexicon.span_scores(bi, starts, ends)

    def lens_scores(
        self,
        entries_per_row: Sequence[Sequence[Entry]],
        rows_batch: Sequence[int],
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        prefix: int,
        ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LensNet's scores ``[R, W]`` and mask of each row's WC; ``ids`` (the windows' token ids) are needed by a
        LensNet that reads lexical match scores."""
        raw = getattr(self.lensnet, "raw_embedding", "mean")
        emb, lv, wd, dist, mask = W.entry_features(
            entries_per_row, rows_batch, tok, gists, self.k, prefix, raw
        )
        tail_n = min(getattr(self.lensnet, "tail_tokens", 0), prefix)
        bi = torch.as_tensor(list(rows_batch), device=tok.device)
        tail = tok[bi, prefix - tail_n : prefix] if tail_n else None
        extra = {}
        lex = LexicalInput.of(self.lensnet)
        if lex.tokens:
            extra["lexical"] = self.lexical_scores(
                entries_per_row,
                rows_batch,
                ids,
                prefix,
                lex.tokens,
                lex.lookback,
                lex.follow,
                lex.idf_power,
                lex.max_df,
            )
        return self.lensnet(emb, lv, wd, dist, tail, mask, **extra), mask

    # ------------------------------------------------------------------ utilities
    @torch.no_grad()
    def measure_utilities(
        self,
        bank: torch.Tensor,
        entries: Sequence[Entry],
        cand: np.ndarray,
        prefix: int,
        targets: torch.Tensor,
        per_token: bool = False,
        teacher: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, C]`` utilities of the candidate entries of one WC shared by the batch: ONE base forward.

        ``per_token``: ``[B, C, H]``, each horizon token's share before the mean (validation splits it in halves).
        ``teacher`` (full-context logits ``[B, H, V]``): expected instead of sampled gains (see the module doc)."""
        plan = self.plan_for(entries, cand, prefix, bank)
        return self.utilities_from(self.variant_logits(bank, plan), plan, targets, teacher, per_token)

    def plan_for(
        self, entries: Sequence[Entry], cand: np.ndarray, prefix: int, bank: torch.Tensor
    ) -> LensPlan:
        """The plan of a given WC and candidates for the bank's windows, on the bank's device."""
        return self.planner.plan(list(entries), cand, prefix, windows=bank.shape[0]).to(bank.device)

    def variant_logits(self, bank: torch.Tensor, plan: LensPlan) -> torch.Tensor:
        """Horizon logits ``[(1+C)*B, H, V]`` of the plan's WC and of its C one-entry variants for every window,
        rows variant-major (windows inner)."""
        t0 = time.perf_counter()
        rows = plan.rows
        embeds = W.gather_rows(bank, rows)
        t0 = self._tick("build_variants", t0)
        logits = W.horizon_logits(self.base, embeds, rows, self.horizon)
        self._tick("base_forward", t0)
        return logits

    def utilities_from(
        self,
        logits: torch.Tensor,
        plan: LensPlan,
        targets: torch.Tensor,
        teacher: torch.Tensor | None = None,
        per_token: bool = False,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Signed gains ``[B, C]`` (``[B, C, H]`` per token) from :meth:`variant_logits` of ``plan``. ``gate``
        (``[B, H]`` bool, with ``teacher``): the tokens that take the expected gain; the others take the sampled one."""
        b, batch = targets.shape[0], plan.rows.batch
        # rows are variant-major, windows inner (row r belongs to window r % B), as variant_cross_entropy expects
        if teacher is None:
            per_row = W.token_nll(logits, targets[batch])
        else:
            per_row = W.variant_cross_entropy(teacher, logits)
            if gate is not None:
                per_row = torch.where(gate[batch], per_row, W.token_nll(logits, targets[batch]))
        loss = per_row.view(-1, b, per_row.shape[-1]).transpose(0, 1)  # [B, 1+C, H]
        utils = (loss[:, :1] - loss[:, 1:]) * plan.sign[..., None]
        return utils if per_token else utils.mean(-1)

    @property
    def measured(self) -> tuple[str, ...]:
        """The measurements the training target needs (``mixed`` needs both)."""
        u = self.hparams.utility
        return MEASUREMENTS if u == "mixed" else (u,)

    def target_utilities(self, by_measure: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training target from the measurements: one of them, or their mean for ``mixed`` (the sampled gain
        keeps the signal of the token that came, e.g. a needle's answer; the expected one the teacher's low noise)."""
        return torch.stack([by_measure[m] for m in self.measured]).mean(0)

    def training_target(
        self,
        logits: torch.Tensor,
        plan: LensPlan,
        targets: torch.Tensor,
        teacher: torch.Tensor | None,
        known: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[B, C]`` utilities LensNet trains on from :meth:`variant_logits`: the ``utility`` measurement(s), the
        expected one against the teacher sharpened by ``teacher_temperature`` (logits / T) and, with ``teacher_gate``
        = g, the sampled gain instead on the horizon tokens the teacher misses with probability >= g on its argmax.
        ``known``: measurements already taken from these logits (validation's), reused where the target is the plain
        measurement."""
        t, g = self.hparams.teacher_temperature, self.hparams.teacher_gate
        gated = g is not None
        sharp = None if teacher is None else teacher / t
        gate = None
        if gated and teacher is not None:
            # where the teacher misses the token that came with at least ``g`` of its mass on another one (a multi-key
            # question it answers with a distractor's value), its expected gain rewards fetching the wrong needle:
            # those tokens keep the sampled gain
            top = torch.softmax(teacher.float(), -1).max(-1)
            gate = (top.indices == targets) | (top.values < g)
        known = known or {}

        def measure(m: str) -> torch.Tensor:
            if m in known and (m == "sampled" or (t == 1.0 and not gated)):
                return known[m]
            if m == "sampled":
                return self.utilities_from(logits, plan, targets)
            return self.utilities_from(logits, plan, targets, sharp, gate=gate)

        return self.target_utilities({m: measure(m) for m in self.measured})

    def teacher(self, ids: torch.Tensor, prefix: int) -> torch.Tensor:
        """Full-context horizon logits ``[B, H, V]`` (the raw window, no WC)."""
        with torch.no_grad():
            return W.teacher_logits(self.base, ids, prefix, self.horizon)

    def sample_step(self, step: int, prefix: int, kind: str | None = None) -> tuple[list[Entry], np.ndarray]:
        """A WC and its C candidates (:meth:`~mchar.lit.lens_plan.LensPlanner.sample`)."""
        return self.planner.sample(step, prefix, kind)

    def validation_wc(
        self, batch_idx: int, prefix: int, kind: str, draw: int = 0
    ) -> tuple[list[Entry], np.ndarray]:
        """The ``draw``-th validation WC of ``kind`` and its candidates for a held-out batch (seeds apart from
        every training step's, and from ``val_seed``; draw 0 is the one a single-draw validation takes)."""
        return self.val_planner.sample(-1 - batch_idx - 1000 * draw, prefix, kind)

    def on_policy_plan(
        self,
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        prefix: int,
        gen: np.random.Generator,
        ids: torch.Tensor | None = None,
    ) -> LensPlan:
        """Every window's WC as the allocator builds it from LensNet's *current* scores, and C of its entries:
        training states drawn from the learner's own policy (DAgger-style), so LensNet is corrected where its
        allocations actually go, not only on random WCs it never produces."""
        wcs = self.allocate("lensnet", tok.shape[0], tok, gists, prefix, gen, ids=ids)
        return self.own_plan([list(wc.entries) for wc in wcs], prefix, gen)

    def settle_plan(
        self,
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        prefix: int,
        gen: np.random.Generator,
        ids: torch.Tensor,
    ) -> LensPlan:
        """Every window's WC as a session's settle builds it before an answer, and C of its entries: the coarsest
        cover refocused on LensNet's current z-scores plus ``settle_weight`` x the question's sharpened lexical
        z-scores (``allocator.query_*``), budget-filling. There LensNet's own ranking fills the slots the matched
        needle leaves, with a distractor's value when it ranks high; training on the utilities measured in that
        state teaches the fill (docs/FINDINGS.md, *LensNet trained on settle states*)."""
        hp = self.hparams
        n = tok.shape[0]
        wcs = [initial_context(self.shape(prefix), self.budget, expand_recent=False) for _ in range(n)]
        cap = hp.alloc_edits or 1 << 20  # the session's edits per refocus (allocator.n_diff)
        allocs = [
            FocusAllocator(fill_budget=True, max_edits=cap, cooldown=0, protect_tokens=hp.protect_tokens)
            for _ in range(n)
        ]
        settling = list(range(n))
        for _ in range(hp.settle_rounds):
            ents = [list(wcs[i].entries) for i in settling]
            own = self.policy_scores(
                "lensnet",
                [wcs[i] for i in settling],
                tok[settling],
                [g[settling] for g in gists],
                prefix,
                gen,
                ids=ids[settling],
            )
            follow, power, max_df = hp.settle_follow, hp.settle_idf_power, hp.settle_max_df
            lex = self.lexical_scores(
                ents, range(len(ents)), ids[settling], prefix, self.k, 1, follow, power, max_df
            )
            lex = lex.float().cpu()
            moved = [
                i
                for j, i in enumerate(settling)
                if allocs[i].refocus(wcs[i], blend_scores(own[j], lex[j, : len(ents[j])], hp.settle_weight))
            ]
            if not moved:
                break
            settling = moved
        return self.own_plan([list(wc.entries) for wc in wcs], prefix, gen)

    def own_plan(self, per_window: list[list[Entry]], prefix: int, gen: np.random.Generator) -> LensPlan:
        """The plan of one WC per window, each with C of its own entries as candidates (as many in every window)."""
        most = min(len(e) for e in per_window)
        return self.planner.plan_windows([self.planner.pick(e, gen, most) for e in per_window], prefix)

    def step_plan(
        self,
        step: int,
        prefix: int,
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        ids: torch.Tensor | None = None,
    ) -> LensPlan:
        """The plan step ``step`` trains on: the allocator's own WCs on an on-policy step, the settle's on a settle
        step, else the planner's (one WC for the batch)."""
        if self.hparams.on_policy > 0:
            gen = np.random.default_rng(W.step_seed(self.hparams.seed, step, 17))
            if gen.random() < self.hparams.on_policy:
                return self.on_policy_plan(tok, gists, prefix, gen, ids)
        if self.hparams.settle_states > 0:
            gen = np.random.default_rng(W.step_seed(self.hparams.seed, step, 23))
            if gen.random() < self.hparams.settle_states:
                if ids is None:
                    raise ValueError("lensnet.settle_states: a settle step needs the windows' token ids")
                return self.settle_plan(tok, gists, prefix, gen, ids)
        return self.planner.plan(*self.sample_step(step, prefix), prefix, tok.shape[0])

    def lens_loss(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Counterfactual targets + LensNet ranking loss for one batch (timed per phase when ``profile``)."""
        t0 = time.perf_counter()
        ids = ids.to(self.device)
        prefix, targets, tok, gists, bank = self.window_state(ids)
        t0 = self._tick("gists", t0)
        plan = self.step_plan(step, prefix, tok, gists, ids).to(self.device)
        t0 = self._tick("sample_wc", t0)
        teacher = self.teacher(ids, prefix) if self.hparams.utility != "sampled" else None
        utils = self.training_target(self.variant_logits(bank, plan), plan, targets, teacher)
        t0 = self._tick("utilities", t0)
        scores, _ = self.lens_scores(plan.entries, range(ids.shape[0]), tok, gists, prefix, ids)
        t0 = self._tick("lens_forward", t0)
        cs = scores.gather(1, plan.cand_index)
        if self.hparams.loss == "regression":
            loss = regression_loss(cs, utils)
        else:
            loss = pairwise_bt_loss(cs, utils, norm=self.hparams.pair_norm, weight=self.hparams.pair_weight)
        self._tick("loss", t0)
        return loss, {
            "lens_loss": loss.detach(),
            "utility_mean": utils.mean(),
            "utility_abs": utils.abs().mean(),
        }

    # ------------------------------------------------------------------ Lightning
    def step_loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one optimisation step (Lightning and the plain-loop benchmark both call this)."""
        return self.lens_loss(batch, step)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, logs = self.step_loss(batch, int(self.global_step))
        if is_logging_step(self):
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch.shape[0])
        return loss

    # ------------------------------------------------------------------ allocation (validation, e2e)
    def policy_scores(
        self,
        policy: str,
        wcs: Sequence[WorkingContext],
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        prefix: int,
        gen: np.random.Generator,
        lookahead: bool | None = None,
        ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per-WC entry scores of a score source (higher = expand first, lower = collapse first).

        With ``lookahead`` (default: the module's setting) the content scorers rate each LOD>=2 gist by the best
        of its children, as the evaluation sessions do (``allocator.lookahead``). ``ids`` (the windows' token
        ids): needed by ``lexical`` and by a LensNet that reads lexical match scores."""
        ents = [list(wc.entries) for wc in wcs]
        if (self.hparams.lookahead if lookahead is None else lookahead) and policy in CONTENT_POLICIES:
            views = [lookahead_view(e, self.k) for e in ents]
            view_wcs = [
                WorkingContext(self.k, self.depth, 1 << 30, wc.num_tokens, entries=v)
                for wc, (v, _) in zip(wcs, views, strict=True)
            ]
            scored = self.policy_scores(policy, view_wcs, tok, gists, prefix, gen, lookahead=False, ids=ids)
            return [max_by_owner(s, o, len(e)) for s, (_, o), e in zip(scored, views, ents, strict=True)]
        if policy == "lensnet":
            s, _ = self.lens_scores(ents, range(len(wcs)), tok, gists, prefix, ids)
            return [s[i, : len(e)].float().cpu() for i, e in enumerate(ents)]
        if policy == "lexical":  # the streaming policy's defaults: a block of query, one block of lookback
            s = self.lexical_scores(ents, range(len(wcs)), ids, prefix, self.k, 1)
            lengths = torch.tensor([len(e) for e in ents], device=s.device)
            s = standardise_rows(s, torch.arange(s.shape[1], device=s.device) < lengths[:, None])
            return [s[i, : len(e)].float().cpu() for i, e in enumerate(ents)]
        out = []
        for i, e in enumerate(ents):
            ends = torch.tensor([x.end(self.k) for x in e], dtype=torch.float32)
            if policy == "recency":
                out.append(ends - prefix)
            elif policy == "sink_recent":  # recency, plus the first block (attention sink) ranked first
                starts = torch.tensor([x.start(self.k) for x in e], dtype=torch.float32)
                out.append(torch.where(starts < self.k, torch.full_like(ends, float(prefix)), ends - prefix))
            elif policy == "random":
                out.append(torch.from_numpy(gen.standard_normal(len(e))).float())
            elif policy == "similarity":
                emb, _, _, _, _ = W.entry_features([e], [i], tok, gists, self.k, prefix)
                query = tok[i, prefix - self.k : prefix].mean(0)
                out.append(F.cosine_similarity(emb[0], query[None], dim=-1).float().cpu())
            else:
                raise ValueError(f"unknown score source {policy!r}")
        return out

    @torch.no_grad()
    def allocate(
        self,
        policy: str,
        n: int,
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        prefix: int,
        gen: np.random.Generator,
        ids: torch.Tensor | None = None,
    ) -> list[WorkingContext]:
        """WCs the allocator builds at the budget, rescoring each round (``alloc_rounds``).

        ``alloc_start="recent"`` (default) starts where a session does, from the recency-first WC, and refocuses with
        the session's protected tail and edit cap: the NLL is what the deployed allocator gets from these scores.
        ``"coarsest"`` fills the budget greedily from the coarsest cover with no cap (scores alone decide every
        expand). ``gists_only`` is the coarsest cover either way."""
        shape = self.shape(prefix)
        hp = self.hparams
        if policy == "gists_only":
            return [initial_context(shape, self.budget, expand_recent=False) for _ in range(n)]
        recent = hp.alloc_start == "recent"
        wcs = [initial_context(shape, self.budget, expand_recent=recent) for _ in range(n)]
        allocs = [
            FocusAllocator(
                fill_budget=True,
                max_edits=(hp.alloc_edits or 1 << 20) if recent else 1 << 20,
                cooldown=2,
                protect_tokens=hp.protect_tokens if recent else 0,
            )
            for _ in range(n)
        ]
        for _ in range(self.hparams.alloc_rounds):
            scores = self.policy_scores(policy, wcs, tok, gists, prefix, gen, ids=ids)
            if not sum(len(a.refocus(wc, s)) for a, wc, s in zip(allocs, wcs, scores, strict=True)):
                break
        return wcs

    @torch.no_grad()
    def evaluate_batch(
        self, ids: torch.Tensor, batch_idx: int, policies: Sequence[str] = ALLOC_POLICIES
    ) -> dict[str, torch.Tensor]:
        ids = ids.to(self.device)
        n = ids.shape[0]
        prefix, targets, tok, gists, bank = self.window_state(ids)
        teacher = self.teacher(ids, prefix)
        out: dict[str, torch.Tensor] = {"teacher_nll": W.token_nll(teacher, targets).mean(1)}
        # rank agreement on both kinds of training WC, every batch: the recency-first ones a session starts from,
        # and the random-fill ones with far-back LOD1/raw candidates (mostly near-zero utilities, harder to rank)
        kinds = ("recent", "fill") if self.hparams.random_fill > 0 else ("recent",)
        # Two references put LensNet's Spearman in scale: the hand-made scorers' agreement with the same utilities,
        # and the utilities' odd/even split-half agreement (how much of a window's ranking the horizon's tokens
        # agree on; a ranking that only some tokens show is noise no scorer can predict).
        gen = np.random.default_rng(W.step_seed(self.hparams.val_seed, batch_idx, 19))
        # Both utility measurements (sampled, expected: suffix "" and "_expected") from the same variant forward.
        suffixes = {u: "" if u == "sampled" else f"_{u}" for u in MEASUREMENTS}
        refs: dict[str, list[torch.Tensor]] = {
            f"spearman{x}/{p}": [] for x in suffixes.values() for p in RANK_REFERENCES
        }
        halves: dict[str, list[torch.Tensor]] = {x: [] for x in suffixes.values()}
        ranks: dict[str, list[torch.Tensor]] = {x: [] for x in suffixes.values()}
        by_kind: dict[str, list[torch.Tensor]] = {
            f"{m}_{k}": [] for m in ("spearman", "lens_loss") for k in kinds
        }
        # ``val_wc_draws`` WCs of each kind per batch (draw 0 is the one a single draw takes): a window's Spearman
        # moves with the WC and candidates drawn, which on 8-12 held-out windows is most of the seed-to-seed spread
        for kind, draw in ((k, d) for k in kinds for d in range(self.hparams.val_wc_draws)):
            entries, cand = self.validation_wc(batch_idx, prefix, kind, draw)
            plan = self.plan_for(entries, cand, prefix, bank)
            logits = self.variant_logits(bank, plan)
            scores, _ = self.lens_scores([entries] * n, range(n), tok, gists, prefix, ids)
            cs = scores.gather(1, plan.cand_index)
            wc = WorkingContext(self.k, self.depth, 1 << 30, prefix, entries=entries)
            ref_scores = {
                p: torch.stack(self.policy_scores(p, [wc] * n, tok, gists, prefix, gen, ids=ids))[
                    :, torch.as_tensor(cand)
                ]
                for p in RANK_REFERENCES
            }
            measured: dict[str, torch.Tensor] = {}
            for measure, x in suffixes.items():
                per_token = self.utilities_from(
                    logits, plan, targets, teacher if measure == "expected" else None, True
                )
                utils = measured[measure] = per_token.mean(-1)
                ranks[x].append(per_window_spearman(cs, utils))
                if measure == "sampled":
                    by_kind[f"spearman_{kind}"].append(ranks[x][-1])
                for p in RANK_REFERENCES:
                    refs[f"spearman{x}/{p}"].append(per_window_spearman(ref_scores[p], utils.cpu()))
                halves[x].append(
                    per_window_spearman(per_token[..., 0::2].mean(-1), per_token[..., 1::2].mean(-1))
                )
            # the loss LensNet trains on, on held-out windows
            by_kind[f"lens_loss_{kind}"].append(
                pairwise_bt_loss(
                    cs,
                    self.training_target(logits, plan, targets, teacher, measured),
                    norm=self.hparams.pair_norm,
                    weight=self.hparams.pair_weight,
                ).reshape(1)
            )
        for x in suffixes.values():
            out[f"spearman{x}"] = torch.cat(ranks[x])
            out[f"utility_split_half{x}"] = torch.cat(halves[x])
        out |= {name: torch.cat(v) for name, v in (refs | by_kind).items()}
        out["lens_loss"] = torch.cat([out[f"lens_loss_{k}"] for k in kinds]).mean().reshape(1)
        gen = np.random.default_rng(W.step_seed(self.hparams.val_seed, batch_idx, 13))
        offs = W.bank_offsets(prefix + self.horizon, prefix, self.k, self.depth)
        spec = []
        for p in policies:
            for i, wc in enumerate(self.allocate(p, n, tok, gists, prefix, gen, ids=ids)):
                spec.append((i, *self.slots(wc.entries, offs)))
        nll = self.horizon_nll(bank, spec, prefix, targets).view(len(policies), n)
        for j, p in enumerate(policies):
            out[f"alloc_nll/{p}"] = nll[j]
        return out

    def finish_set(self, prefix: str, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adds ``<set>/alloc_gain/<policy>`` = baseline's horizon NLL - LensNet's at the same budget."""
        lens = metrics.get(f"{prefix}/alloc_nll/lensnet")
        if lens is not None:
            for p in ALLOC_POLICIES[1:]:
                if f"{prefix}/alloc_nll/{p}" in metrics:
                    metrics[f"{prefix}/alloc_gain/{p}"] = metrics[f"{prefix}/alloc_nll/{p}"] - lens
        return metrics

    def lensnet_groups(self, lr: float) -> list[dict[str, Any]]:
        """LensNet's parameters as optimizer groups: the linear prior path at ``prior_lr_scale`` x ``lr`` (so a short
        fit can move the recency / lexical balance it was initialised with), the rest at ``lr``; at scale 1 one group
        (the optimizer state of checkpoints from before the setting keeps its shape)."""
        prior = self.lensnet.prior
        scale = self.hparams.prior_lr_scale
        own = [p for p in prior.parameters() if p.requires_grad] if prior is not None and scale != 1.0 else []
        rest = [p for p in self.lensnet.parameters() if p.requires_grad and all(p is not q for q in own)]
        groups = [{"params": rest, "lr": lr, "name": "lensnet"}]
        return groups + ([{"params": own, "lr": lr * scale, "name": "lensnet_prior"}] if own else [])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.lensnet_groups(self.hparams.lr), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, directory: Any) -> Any:
        return self.lensnet.save_pretrained(directory)
