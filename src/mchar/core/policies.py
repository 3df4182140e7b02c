"""Score sources for the focus allocator, which double as in-harness peer baselines at the same budget.

Each policy has a ``name``, ``allows_drop`` and ``scores(wc, tree, context) -> Tensor[n_entries]`` (positive =
worth expanding, negative = safe to collapse, NaN = no opinion). Truncation baselines (``recency``,
``sink_recent``) throw history away instead of gisting it, which the allocator never does; they build their WC
directly with ``build(tree, budget)``, marking what they lose as *dropped* so the loss is explicit and counted.
Every policy can ``build`` a starting WC; the non-dropping ones start from :func:`initial_context`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mchar.core.allocator import initial_context
from mchar.core.entries import Entry
from mchar.core.lexical import LexicalIndex, LexicalInput
from mchar.core.lookahead import lookahead_view, max_by_owner
from mchar.core.positions import check_mode, gist_position
from mchar.core.working_context import BudgetExceeded, WorkingContext, coarsest_cover


@dataclass
class PolicyContext:
    """What a policy may look at besides the WC and the tree (all optional).

    ``tail_embeds`` [t, d] recent token embeddings (the query), ``base_lm`` and ``future_tokens`` [H] (the true
    next tokens, oracle only), ``position_mode`` as used for assembly.
    """

    tail_embeds: torch.Tensor | None = None
    base_lm: Any = None
    future_tokens: torch.Tensor | None = None
    position_mode: str = "centre"


def entry_vectors(wc: WorkingContext, tree: Any, raw: str = "mean") -> torch.Tensor:
    """One vector per WC entry [n, d]: the gist itself, and for a raw block the mean of its K token embeddings
    or (``raw="gist"``) its LOD1 gist (LensNet's convention, see ``mchar.core.lensnet.entry_embedding``)."""
    entries = list(wc.entries)
    if not entries:
        return torch.zeros(0, int(getattr(tree, "dim", 1)))
    if raw == "gist":
        k = wc.block_size
        return tree.entry_embeddings([e.parent(k) if e.level == 0 else e for e in entries]).float()
    rows = tree.entry_embeddings(entries)
    rows = rows.reshape(-1, rows.shape[-1]).float()
    k = wc.block_size
    counts = torch.tensor([k if e.level == 0 else 1 for e in entries])
    seg = torch.repeat_interleave(torch.arange(len(entries)), counts).to(rows.device)
    out = torch.zeros(len(entries), rows.shape[-1], dtype=rows.dtype, device=rows.device)
    out.index_add_(0, seg, rows)
    return out / counts.to(rows.device, rows.dtype).unsqueeze(1)


def recent_token_embeds(wc: WorkingContext, tree: Any, n: int) -> torch.Tensor:
    """Embeddings of the last ``n`` tokens the WC covers (the query for retrieval-style scores)."""
    t = wc.num_tokens
    ids = tree.tokens(max(0, t - n), t)
    if ids.numel() == 0:
        return torch.zeros(0, int(getattr(tree, "dim", 1)))
    return tree.embed_fn(ids.reshape(-1)).detach().float()


def _recency_ramp(wc: WorkingContext) -> torch.Tensor:
    """+1 for the newest entry down to -1 for the oldest (by span start)."""
    if not len(wc):
        return torch.zeros(0)
    starts = torch.as_tensor(wc.starts(), dtype=torch.float32)
    return 2.0 * starts / max(1.0, float(wc.tail_start)) - 1.0


class Policy:
    """Base class: a named score source."""

    name: ClassVar[str] = "base"
    allows_drop: ClassVar[bool] = False
    relative_scores: ClassVar[bool] = False
    """True when only the order of the scores means something (z-scored, uniform, learned up to a shift): the
    allocator's absolute thresholds then say nothing, so the harness may run it in budget-filling mode."""

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        raise NotImplementedError

    def build(self, tree: Any, budget: int, depth: int | None = None) -> WorkingContext:
        """Starting WC at ``budget``."""
        return initial_context(tree, budget, depth=depth)


def _truncated(tree: Any, budget: int, depth: int | None, sink_blocks: int) -> WorkingContext:
    """Raw sink blocks + as many most-recent raw blocks as fit + raw tail; the middle is dropped (aligned)."""
    k = int(tree.block_size)
    depth = int(tree.depth if depth is None else depth)
    t = int(tree.num_tokens)
    n_full, tail = t // k, t % k
    if tail > budget:
        raise BudgetExceeded(f"allocator.budget={budget} cannot even hold the {tail}-token raw tail")
    avail = budget - tail
    sink = min(sink_blocks, n_full, avail // k)
    recent = min(n_full - sink, (avail - sink * k) // k)
    mid_lo, mid_hi = sink, n_full - recent
    middle = coarsest_cover(k, depth, t, tree, start_block=mid_lo, end_block=mid_hi)
    entries = [Entry(0, b) for b in range(sink)] + middle + [Entry(0, b) for b in range(mid_hi, n_full)]
    dropped = [False] * sink + [True] * len(middle) + [False] * recent
    return WorkingContext(k, depth, budget, t, entries=entries, dropped=dropped, allows_drop=True, tree=tree)


class RecencyPolicy(Policy):
    """Plain truncation: keep only the most recent raw tokens, drop everything else."""

    name = "recency"
    allows_drop = True

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        return _recency_ramp(wc)

    def build(self, tree: Any, budget: int, depth: int | None = None) -> WorkingContext:
        return _truncated(tree, budget, depth, sink_blocks=0)


class SinkRecentPolicy(Policy):
    """StreamingLLM-style: the first ``sink_blocks`` blocks raw (attention sinks) + the most recent raw tokens.

    Positions stay the true token positions (StreamingLLM re-indexes inside its cache; we keep the base model's
    view consistent with every other method here).
    """

    name = "sink_recent"
    allows_drop = True

    def __init__(self, sink_blocks: int = 1) -> None:
        self.sink_blocks = int(sink_blocks)

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        s = _recency_ramp(wc)
        if len(s):
            s[: min(self.sink_blocks, len(s))] = 1.0
        return s

    def build(self, tree: Any, budget: int, depth: int | None = None) -> WorkingContext:
        return _truncated(tree, budget, depth, sink_blocks=self.sink_blocks)


class TreeRecencyPolicy(Policy):
    """MegaContext's tree with a recency focus: the whole history stays covered by gists and the newest entries
    are expanded first (the scores are :func:`_recency_ramp`). It pays the same cover cost as every tiling policy,
    so ``lensnet - tree_recency`` measures what a learned focus adds, apart from what gisting costs against
    plain truncation (``tree_recency - recency``)."""

    name = "tree_recency"
    relative_scores = True

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        return _recency_ramp(wc)


class GistsOnlyPolicy(Policy):
    """Compressive memory: all history as gists, never re-expanded.

    Raw blocks score -1 (collapse them), gists a tiny negative value that stays above ``-tau_collapse`` so the
    allocator leaves them alone unless it needs room: all scores are negative, so nothing is ever expanded.
    """

    name = "gists_only"

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        levels = torch.as_tensor(wc.levels())
        return torch.where(levels == 0, torch.tensor(-1.0), torch.tensor(-1e-3))

    def build(self, tree: Any, budget: int, depth: int | None = None) -> WorkingContext:
        """Coarsest cover, then the newest coarse gists refined down to LOD1 (never to raw) while they fit."""
        wc = initial_context(tree, budget, depth=depth, expand_recent=False)
        k = wc.block_size
        while wc.cost + k - 1 <= budget:
            i = next((j for j in range(len(wc) - 1, -1, -1) if wc[j].level > 1), None)
            if i is None:
                break
            wc.expand(i)
        return wc


class SimilarityPolicy(Policy):
    """InfLLM / landmark retrieval: expand entries whose vector is most cosine-similar to the recent query.

    Query = mean embedding of the last ``query_tokens`` tokens (default K). Scores are z-scored across entries,
    so the most relevant are positive and the least relevant negative.
    """

    name = "similarity"
    relative_scores = True

    def __init__(self, query_tokens: int | None = None, scale: float = 1.0) -> None:
        self.query_tokens = query_tokens
        self.scale = float(scale)

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        if not len(wc):
            return torch.zeros(0)
        vecs = entry_vectors(wc, tree)
        tail = context.tail_embeds if context is not None and context.tail_embeds is not None else None
        if tail is None:
            tail = recent_token_embeds(wc, tree, self.query_tokens or wc.block_size)
        if tail.numel() == 0:
            return torch.zeros(len(wc))
        query = tail.reshape(-1, tail.shape[-1]).float().mean(0).to(vecs.device)
        sims = F.cosine_similarity(vecs, query.unsqueeze(0), dim=-1)
        if sims.numel() < 2:
            return sims.cpu() * self.scale
        return ((sims - sims.mean()) / (sims.std() + 1e-6) * self.scale).cpu()


class LexicalPolicy(Policy):
    """BM25-style block retrieval: expand entries whose span holds the query's rare tokens.

    Query = the last ``query_tokens`` token ids (default K); an entry scores the summed inverse document frequency
    (over the tree's blocks) of the distinct query tokens found in its span or in the ``lookback`` blocks before it,
    z-scored across entries (``follow`` > 0: also the ``follow`` blocks after it; ``idf_power`` > 1: each token
    weighs IDF to that power, so the rarest query tokens outweigh words several blocks share; ``max_df``: query
    tokens more than that many blocks hold count nothing; a settle's ``allocator.query_follow`` /
    ``allocator.query_idf_power`` / ``allocator.query_max_df``). Unlike
    ``similarity``'s mean embeddings it tells apart needles that share their wording
    and differ in one key. The lookback is there because what answers a match follows it: a needle's key may end one
    block and its value fill the next, which holds none of the question's words. The tree's blocks are indexed
    incrementally (:class:`~mchar.core.lexical.LexicalIndex`), one index per tree.
    """

    name = "lexical"
    relative_scores = True

    def __init__(
        self,
        query_tokens: int | None = None,
        lookback: int = 1,
        follow: int = 0,
        idf_power: float = 1.0,
        max_df: int | None = None,
    ) -> None:
        for key, value in (("lookback", lookback), ("follow", follow)):
            if value < 0:
                raise ValueError(f"lexical: {key} must be >= 0, got {value}")
        if not idf_power > 0:
            raise ValueError(f"lexical: idf_power must be > 0, got {idf_power}")
        if max_df is not None and max_df < 1:
            raise ValueError(f"lexical: max_df must be >= 1 or None, got {max_df}")
        self.query_tokens, self.lookback, self.follow = query_tokens, int(lookback), int(follow)
        self.idf_power = float(idf_power)
        self.max_df = None if max_df is None else int(max_df)
        self._tree: Any = None
        self._index = LexicalIndex()

    def index(self, tree: Any) -> LexicalIndex:
        """This tree's index, grown to its completed blocks (a new tree, or a shorter one, starts a new index)."""
        if tree is not self._tree or int(tree.num_tokens) // int(tree.block_size) < self._index.blocks:
            self._tree, self._index = tree, LexicalIndex()
        self._index.update(tree)
        return self._index

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        if not len(wc):
            return torch.zeros(0)
        k, t = wc.block_size, wc.num_tokens
        query = tree.tokens(max(0, t - (self.query_tokens or k)), t)
        back, ahead = (
            self.lookback,
            self.follow,
        )  # entries end on blocks; a span past the index holds nothing more
        spans = [(max(0, e.start(k) // k - back), e.end(k) // k + ahead) for e in wc.entries]
        return standardise(self.index(tree).span_scores(query, spans, self.idf_power, self.max_df))


class RandomPolicy(Policy):
    """Uniform scores in [-1, 1] from a seeded generator (a floor every learned scorer must beat)."""

    name = "random"
    relative_scores = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        return torch.rand(len(wc), generator=self.generator) * 2.0 - 1.0


class AttentionPolicy(Policy):
    """H2O / SnapKV at entry granularity: the base's own attention from the newest tokens to each entry.

    One eager forward of the assembled WC; an entry scores the log of the attention mass its slots receive from
    the last ``query_tokens`` positions (default K), averaged over heads and over layers (or only ``layer``), summed
    over the entry's slots (``per_slot``: averaged, so a raw block's K slots do not outweigh a gist's one). A gist
    the base already leans on is the one worth opening; a raw block it ignores is the one to give back. Needs a
    base that returns attention weights (``FrozenBaseLM.attention_received``)."""

    name = "attention"
    relative_scores = True

    def __init__(
        self,
        base_lm: Any = None,
        query_tokens: int | None = None,
        layer: int | None = None,
        per_slot: bool = False,
    ) -> None:
        self.base_lm = base_lm
        self.query_tokens = query_tokens
        self.per_slot = bool(per_slot)
        self.layer = layer

    @torch.no_grad()
    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        n = len(wc)
        lm = self.base_lm if self.base_lm is not None else (context.base_lm if context is not None else None)
        if lm is None:
            raise ValueError("attention policy: needs a base_lm that returns attention weights")
        out = torch.full((n,), float("nan"))
        if n == 0:
            return out
        mode = context.position_mode if context is not None else "centre"
        emb, pos, slots = wc.assemble(tree, position_mode=mode)
        dev = getattr(lm, "device", emb.device)
        queries = self.query_tokens or wc.block_size
        mass = lm.attention_received(emb.to(dev), pos.to(dev), queries, layer=self.layer)[0].cpu()
        ent = slots.entry_index
        live = ent >= 0
        total = torch.zeros(n).index_add_(0, ent[live], mass[live])
        count = torch.bincount(ent[live], minlength=n).float()
        have = count > 0
        value = total[have] / count[have] if self.per_slot else total[have]
        out[have] = torch.log(value.clamp_min(1e-12))
        return out


LensFn = Callable[..., torch.Tensor]


class LensNetPolicy(Policy):
    """Wraps any callable ``lensnet(entry_embeds, levels, widths, distances, tail_embeds) -> scores``.

    Scores are standardised per WC (zero mean, unit std): a pairwise (Bradley–Terry) LensNet is only defined up to
    a shift and scale, while the allocator's ``tau_expand``/``tau_collapse`` are absolute. Without this a LensNet
    whose scores happen to sit below ``-tau_collapse`` collapses everything and leaves most of the budget unused.
    A LensNet that reads lexical match scores (``lexical_tokens > 0``) gets them from its own :class:`LexicalPolicy`
    (the tree's incremental index), with the query length, lookback, follow, IDF power and df cap it was trained with.
    """

    name = "lensnet"
    relative_scores = True

    def __init__(self, lensnet: LensFn, tail_tokens: int | None = None) -> None:
        if not callable(lensnet):
            raise ValueError("lensnet policy: needs a callable LensNet (lensnet=...)")
        self.lensnet = lensnet
        self.tail_tokens = tail_tokens
        lex = LexicalInput.of(lensnet)
        self.lexical = (
            LexicalPolicy(lex.tokens, lex.lookback, lex.follow, idf_power=lex.idf_power, max_df=lex.max_df)
            if lex.tokens
            else None
        )

    def features(
        self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(entry_embeds [n,d], levels [n], widths [n], distances [n], tail_embeds [t,d]) as LensNet expects."""
        k = wc.block_size
        vecs = entry_vectors(wc, tree, getattr(self.lensnet, "raw_embedding", "mean"))
        levels = torch.as_tensor(wc.levels(), dtype=torch.long)
        widths = torch.as_tensor(wc.widths(), dtype=torch.long)
        ends = torch.as_tensor(wc.starts(), dtype=torch.long) + widths
        distances = wc.num_tokens - ends
        tail = context.tail_embeds if context is not None and context.tail_embeds is not None else None
        if tail is None:
            n = self.tail_tokens or getattr(self.lensnet, "tail_tokens", None) or k
            tail = recent_token_embeds(wc, tree, int(n))
        return (
            vecs,
            levels,
            widths,
            distances,
            tail.reshape(-1, vecs.shape[-1] if vecs.numel() else tail.shape[-1]),
        )

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        if not len(wc):
            return torch.zeros(0)
        feats = self.features(wc, tree, context)
        dev = _module_device(self.lensnet)
        if dev is not None:
            feats = tuple(f.to(dev) for f in feats)  # type: ignore[assignment]
            feats = (
                feats[0].to(_module_dtype(self.lensnet)),
                *feats[1:4],  # type: ignore[assignment]
                feats[4].to(_module_dtype(self.lensnet)),
            )
        extra = {}
        if self.lexical is not None:
            lex = self.lexical.scores(wc, tree, context)
            extra["lexical"] = lex if dev is None else lex.to(dev, _module_dtype(self.lensnet))
        with torch.no_grad():
            out = self.lensnet(*feats, **extra)
        out = out.detach().float().reshape(-1).cpu()
        if out.numel() != len(wc):
            raise ValueError(f"lensnet returned {out.numel()} scores for {len(wc)} entries")
        return standardise(out)


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` (NaNs ignored and kept); constant or single scores become 0 (no preference)."""
    ok = ~torch.isnan(scores)
    if int(ok.sum()) < 2:
        return torch.where(ok, torch.zeros_like(scores), scores)
    vals = scores[ok]
    std = vals.std()
    if not bool(std > 1e-12):
        return torch.where(ok, torch.zeros_like(scores), scores)
    return (scores - vals.mean()) / std


def _module_device(m: Any) -> torch.device | None:
    params = getattr(m, "parameters", None)
    if params is None:
        return None
    p = next(iter(params()), None)
    return None if p is None else p.device


def _module_dtype(m: Any) -> torch.dtype:
    p = next(iter(m.parameters()), None)
    return torch.float32 if p is None else p.dtype


class OraclePolicy(Policy):
    """Evaluation-only upper bound: the true counterfactual NLL change on the next ``horizon`` tokens.

    For each gist: NLL(current) - NLL(that one gist expanded) = how much expanding it helps. For each raw block
    (``score_raw``): NLL(block collapsed to its LOD1 gist) - NLL(current) = how much its detail is worth (a block
    whose detail is worthless scores ~0 and is the first to give room). Variants of one kind all have the same
    length, so they run batched through the base model. Needs ``context.future_tokens``.
    """

    name = "oracle"

    def __init__(
        self, base_lm: Any = None, horizon: int | None = None, batch_size: int = 16, score_raw: bool = True
    ) -> None:
        self.base_lm = base_lm
        self.horizon = horizon
        self.batch_size = int(batch_size)
        self.score_raw = bool(score_raw)

    def _positions(self, entries: list[Entry], k: int, mode: str) -> torch.Tensor:
        out: list[int] = []
        for e in entries:
            s, t = e.span(k)
            out.extend(range(s, t) if e.level == 0 else [gist_position(s, t, mode)])
        return torch.tensor(out, dtype=torch.long)

    @torch.no_grad()
    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        lm = self.base_lm if self.base_lm is not None else (context.base_lm if context is not None else None)
        if lm is None or context is None or context.future_tokens is None:
            raise ValueError(
                "oracle policy: needs a base_lm and context.future_tokens (the true next tokens)"
            )
        mode = context.position_mode
        check_mode(mode)
        fut = context.future_tokens.reshape(-1).long()
        if self.horizon is not None:
            fut = fut[: self.horizon]
        h = int(fut.numel())
        n = len(wc)
        out = torch.full((n,), float("nan"))
        if h == 0 or n == 0:
            return out
        k = wc.block_size
        emb, pos, _ = wc.assemble(tree, position_mode=mode)
        dev = getattr(lm, "device", emb.device)
        emb, pos = emb[0].to(dev), pos[0].to(dev)
        fut_in = lm.embed(fut[:-1].to(dev)).to(emb.dtype).reshape(h - 1, emb.shape[-1])
        fut_pos = torch.arange(wc.num_tokens, wc.num_tokens + h - 1, device=dev)
        target = fut.to(dev)

        def nll(batch_emb: torch.Tensor, batch_pos: torch.Tensor) -> torch.Tensor:
            b = batch_emb.shape[0]
            x = torch.cat([batch_emb, fut_in.unsqueeze(0).expand(b, -1, -1)], 1)
            p = torch.cat([batch_pos, fut_pos.unsqueeze(0).expand(b, -1)], 1)
            # the LM head only for the h slots that predict the future tokens (it dominates a small base's cost)
            logits, _ = lm.forward_embeds(x, p, logits_to_keep=h)
            lg = logits[:, -h:].float()
            return (
                F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.repeat(b), reduction="none")
                .view(b, h)
                .mean(1)
            )

        base = float(nll(emb.unsqueeze(0), pos.unsqueeze(0))[0])
        offsets = [0]
        for i in range(n):
            offsets.append(offsets[-1] + wc.entry_cost(i))
        # (entry index, slot range, replacement entries, sign)
        variants: dict[int, list[tuple[int, int, int, list[Entry], float]]] = {}
        for i, e in enumerate(wc.entries):
            if wc.is_dropped(i):
                continue
            if e.level > 0:
                repl, sign = e.children(k), 1.0
            elif self.score_raw and e.parent(k).level <= wc.depth:
                repl, sign = [e.parent(k)], -1.0
            else:
                continue
            m = sum(c.cost(k) for c in repl)
            variants.setdefault(m, []).append((i, offsets[i], offsets[i + 1], repl, sign))
        for group in variants.values():
            for j in range(0, len(group), self.batch_size):
                chunk = group[j : j + self.batch_size]
                embs, poss = [], []
                for _, a, b, repl, _ in chunk:
                    r = tree.entry_embeddings(repl).to(dev, emb.dtype).reshape(-1, emb.shape[-1])
                    embs.append(torch.cat([emb[:a], r, emb[b:]]))
                    poss.append(torch.cat([pos[:a], self._positions(repl, k, mode).to(dev), pos[b:]]))
                v = nll(torch.stack(embs), torch.stack(poss)).cpu()
                for (i, *_rest, sign), val in zip(chunk, v.tolist(), strict=True):
                    out[i] = sign * (base - val)
        return out


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RecencyPolicy,
        SinkRecentPolicy,
        TreeRecencyPolicy,
        GistsOnlyPolicy,
        SimilarityPolicy,
        LexicalPolicy,
        RandomPolicy,
        AttentionPolicy,
        LensNetPolicy,
        OraclePolicy,
    )
}


class LookaheadPolicy(Policy):
    """Any score policy, with every gist of level >= 2 rated by the best of its children (see
    :mod:`mchar.core.lookahead`): the allocator can then walk down to a needle buried under a coarse gist."""

    def __init__(self, inner: Policy, min_level: int = 2) -> None:
        if getattr(inner, "allows_drop", False):
            raise ValueError(
                f"lookahead: {inner.name!r} truncates instead of scoring; it has nothing to look at"
            )
        self.inner, self.min_level = inner, int(min_level)
        self.name = inner.name  # type: ignore[misc]
        self.relative_scores = inner.relative_scores  # type: ignore[misc]

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        view, owner = lookahead_view(wc.entries, wc.block_size, self.min_level)
        if len(view) == len(wc):
            return self.inner.scores(wc, tree, context)
        cost = sum(e.cost(wc.block_size) for e in view) + wc.tail_len
        view_wc = WorkingContext(
            wc.block_size, wc.depth, max(wc.budget, cost), wc.num_tokens, entries=view, tree=tree
        )
        pooled = max_by_owner(self.inner.scores(view_wc, tree, context), owner, len(wc))
        return standardise(pooled) if self.relative_scores else pooled

    def build(self, tree: Any, budget: int, depth: int | None = None) -> WorkingContext:
        return self.inner.build(tree, budget, depth)


class QueryBlendPolicy(Policy):
    """``policy``'s scores plus ``weight`` x ``query``'s, each standardised: what a session may settle on before
    answering (``MegaContextSession(query_policy=...)``), e.g. LensNet plus query similarity once the question is
    known. Only order-only (``relative_scores``) policies blend: their scales are arbitrary, so z-scores are the
    common unit."""

    relative_scores = True

    @staticmethod
    def can_blend(policy: Policy) -> bool:
        """Whether ``policy`` ranks by relative scores (truncation baselines rebuild instead of scoring)."""
        return bool(policy.relative_scores) and not policy.allows_drop

    def __init__(self, policy: Policy, query: Policy, weight: float, recency: float = 0.0) -> None:
        for p in (policy, query):
            if not self.can_blend(p):
                raise ValueError(
                    f"query blend: {p.name!r} does not rank by relative scores; it cannot be blended"
                )
        for key, value in (("weight", weight), ("recency", recency)):
            if not float(value) >= 0:
                raise ValueError(f"query blend: {key} must be >= 0, got {value}")
        self.policy, self.query, self.weight, self.recency = policy, query, float(weight), float(recency)
        self.name = policy.name  # type: ignore[misc]

    def scores(self, wc: WorkingContext, tree: Any, context: PolicyContext | None = None) -> torch.Tensor:
        own, query = self.policy.scores(wc, tree, context), self.query.scores(wc, tree, context)
        ramp = _recency_ramp(wc) if self.recency else None
        return blend_scores(own, query, self.weight, ramp, self.recency)


def blend_scores(
    own: torch.Tensor,
    query: torch.Tensor,
    weight: float,
    ramp: torch.Tensor | None = None,
    recency: float = 0.0,
) -> torch.Tensor:
    """``own``'s z-scores plus ``weight`` x ``query``'s (plus ``recency`` x the recency ramp's), standardised again:
    the settle's blend (a session's :class:`QueryBlendPolicy`, and LensNet's training settle states)."""
    mixed = standardise(own) + weight * standardise(query)
    if ramp is not None and recency:
        mixed = mixed + recency * standardise(ramp.to(mixed))
    return standardise(mixed)


def make_policy(name: str, lookahead: bool = False, **kw: Any) -> Policy:
    """Build a policy by registry name (``allocator.policy`` in configs); ``lookahead`` wraps it in
    :class:`LookaheadPolicy`."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (available: {', '.join(sorted(POLICIES))})") from None
    policy = cls(**kw)
    return LookaheadPolicy(policy) if lookahead else policy


__all__ = [
    "POLICIES",
    "AttentionPolicy",
    "QueryBlendPolicy",
    "blend_scores",
    "GistsOnlyPolicy",
    "LensNetPolicy",
    "LexicalPolicy",
    "LookaheadPolicy",
    "OraclePolicy",
    "Policy",
    "PolicyContext",
    "RandomPolicy",
    "RecencyPolicy",
    "SimilarityPolicy",
    "SinkRecentPolicy",
    "TreeRecencyPolicy",
    "entry_vectors",
    "make_policy",
]
