"""Focus allocator: turns per-entry scores into legal expand/collapse edits under a hard budget.

Scores are signed: positive = worth expanding, negative = safe to collapse. Why the rules look like this:

* **Only legal edits, budget hard.** Every edit goes through :class:`WorkingContext`, which re-checks legality and
  the budget; the allocator never trims (upstream trimmed history when it ran over a *soft* maximum).
* **Expand the best, collapse the worst.** An expand that does not fit is paid for by collapsing the worst-scored
  legal group, but only if that group scores below the expand (a swap must be an improvement). Voluntary
  collapses need ``score < -tau_collapse``.
* **What keeping a group is worth.** A raw block scores itself. K sibling gists score, by default
  (``group_score="parent"``), the score their parent was expanded with: the members' own scores say what expanding
  *them* is worth, not what keeping the group expanded is worth, and with the members' mean a LensNet that scores a
  coarse gist high and its children low had the group expanded and collapsed again every ``cooldown + 1``
  refocuses. An expand whose group would then be the lowest-scored one left is skipped (the next block's arrival
  would collapse it). ``"mean"`` / ``"max"`` of the members are kept as ablations.
* **At most ``max_edits`` per refocus**, so the KV cache stays mostly reusable.
* **Cooldown**: an entry created by an edit cannot be flipped back (re-expanded after a collapse, or re-collapsed
  after an expand) for ``cooldown`` refocuses; upstream's focus oscillated without this.
* **Protected tail**: blocks overlapping the last ``protect_tokens`` tokens are never collapsed voluntarily
  (only :meth:`FocusAllocator.fit_to_budget` may, as a last resort, because the budget wins).
* **Filling the budget** (``fill_budget=True``): for scores that only rank (a LensNet's, ``recency``'s), their sign
  means nothing, so the thresholds are lifted: every free slot goes to the best gist, and blocks are collapsed only
  to pay for a better-scored expand, never to leave the budget empty.
* Entries created during a refocus carry no score, so they are not touched again in the same refocus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mchar.core.entries import Entry
from mchar.core.working_context import (
    BudgetExceeded,
    WorkingContext,
    coarsest_cover,
)

GROUP_SCORES = ("mean", "max", "parent")


@dataclass(frozen=True)
class Edit:
    """One applied edit: ``before`` entries (starting at WC index ``index``) replaced by ``after``."""

    kind: Literal["expand", "collapse"]
    index: int
    before: tuple[Entry, ...]
    after: tuple[Entry, ...]
    score: float


@dataclass
class AllocatorStats:
    """Running focus telemetry (swap rate = edits per entry per refocus)."""

    refocuses: int = 0
    expands: int = 0
    collapses: int = 0
    fit_collapses: int = 0
    skipped_no_room: int = 0
    last_edits: int = 0
    last_swap_rate: float = 0.0
    swap_rate_sum: float = 0.0
    last_utilisation: float = 0.0

    def as_dict(self) -> dict[str, float]:
        mean_swap = self.swap_rate_sum / self.refocuses if self.refocuses else 0.0
        return {
            "refocuses": float(self.refocuses),
            "expands": float(self.expands),
            "collapses": float(self.collapses),
            "fit_collapses": float(self.fit_collapses),
            "skipped_no_room": float(self.skipped_no_room),
            "last_edits": float(self.last_edits),
            "swap_rate": self.last_swap_rate,
            "swap_rate_mean": mean_swap,
            "budget_utilisation": self.last_utilisation,
        }


@dataclass(frozen=True)
class _Cand:
    score: float
    index: int
    entry: Entry
    group: int = 1


def initial_context(
    tree: Any,
    budget: int,
    *,
    depth: int | None = None,
    allows_drop: bool = False,
    strict: bool = False,
    expand_recent: bool = True,
) -> WorkingContext:
    """A legal WC for ``tree`` at ``budget``: the coarsest cover, raw tail, then the newest gists expanded.

    Expanding always the newest gist first gives raw recent blocks, then LOD1, LOD2, ... going back in time,
    which is what a recency prior wants. Raises :class:`BudgetExceeded` naming ``allocator.budget`` when even the
    coarsest cover does not fit.
    """
    k = int(tree.block_size)
    depth = int(tree.depth if depth is None else depth)
    t = int(tree.num_tokens)
    cover = coarsest_cover(k, depth, t, tree)
    need = sum(e.cost(k) for e in cover) + t % k
    if need > budget:
        raise BudgetExceeded(
            f"allocator.budget={budget} is too small: covering {t} tokens at tree depth {depth} (K={k}) needs at "
            f"least {need} ({len(cover)} coarsest entries + {t % k} tail tokens); raise allocator.budget or the "
            f"tree depth"
        )
    wc = WorkingContext(k, depth, budget, t, entries=cover, allows_drop=allows_drop, tree=tree, strict=strict)
    if expand_recent:
        while wc.cost + k - 1 <= budget:
            i = next((j for j in range(len(wc) - 1, -1, -1) if wc[j].level > 0), None)
            if i is None:
                break
            wc.expand(i)
    return wc


class FocusAllocator:
    """Greedy (or stochastic-greedy) refocusing with thresholds, an edit cap, cooldown and a protected tail."""

    def __init__(
        self,
        tau_expand: float = 0.2,
        tau_collapse: float = 0.2,
        max_edits: int = 4,
        cooldown: int = 2,
        protect_tokens: int = 0,
        stochastic: bool = False,
        top_k: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
        group_score: Literal["mean", "max", "parent"] = "parent",
        fill_budget: bool = False,
    ) -> None:
        if max_edits < 0 or cooldown < 0 or protect_tokens < 0 or top_k < 1 or temperature <= 0:
            raise ValueError(
                "allocator: max_edits, cooldown, protect_tokens >= 0, top_k >= 1, temperature > 0"
            )
        if group_score not in GROUP_SCORES:
            raise ValueError(f"allocator: group_score must be one of {GROUP_SCORES}, got {group_score!r}")
        self.group_score = group_score
        self.fill_budget = bool(fill_budget)
        # filling lifts both thresholds: any scored gist may take a free slot, no block leaves one empty
        self.tau_expand = -math.inf if self.fill_budget else float(tau_expand)
        self.tau_collapse = math.inf if self.fill_budget else float(tau_collapse)
        self.max_edits = int(max_edits)
        self.cooldown = int(cooldown)
        self.protect_tokens = int(protect_tokens)
        self.stochastic = bool(stochastic)
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.stats = AllocatorStats()
        self._step = 0
        self._born: dict[Entry, tuple[int, str]] = {}
        self._last_scores: dict[Entry, float] = {}
        self._expanded_at: dict[Entry, float] = {}  # gist -> the score it was expanded with ("parent")
        # False: the churn guard stands aside where the expand and the next block both fit (a settle's ablation)
        self.guard_with_room = True

    def reset(self) -> None:
        """Forget cooldowns, scores and telemetry (new document)."""
        self.generator = torch.Generator().manual_seed(self.seed)
        self.stats = AllocatorStats()
        self._step = 0
        self._born.clear()
        self._last_scores.clear()
        self._expanded_at.clear()

    def telemetry(self) -> dict[str, float]:
        return self.stats.as_dict()

    # ------------------------------------------------------------------ helpers
    def initial_context(self, tree: Any, budget: int, **kw: Any) -> WorkingContext:
        return initial_context(tree, budget, **kw)

    def _protected(self, wc: WorkingContext, entry: Entry) -> bool:
        return self.protect_tokens > 0 and entry.end(wc.block_size) > wc.num_tokens - self.protect_tokens

    def _cooling(self, entry: Entry, created_by: str) -> bool:
        born = self._born.get(entry)
        return born is not None and born[1] == created_by and self._step - born[0] <= self.cooldown

    @staticmethod
    def _score_map(
        wc: WorkingContext, scores: torch.Tensor | Sequence[float] | Mapping[Entry, float]
    ) -> dict[Entry, float]:
        if isinstance(scores, Mapping):
            return {e: float(s) for e, s in scores.items()}
        flat = torch.as_tensor(scores, dtype=torch.float32).detach().reshape(-1).cpu()
        if flat.numel() != len(wc):
            raise ValueError(f"refocus: got {flat.numel()} scores for {len(wc)} entries")
        return {
            e: float(s)
            for e, s, d in zip(wc.entries, flat.tolist(), wc.dropped, strict=True)
            if not d and s == s
        }  # NaN = no opinion

    def _expand_cands(self, wc: WorkingContext, smap: dict[Entry, float], skip: set[Entry]) -> list[_Cand]:
        out = []
        for i, e in enumerate(wc.entries):
            s = smap.get(e)
            if s is None or e.level == 0 or e in skip or wc.is_dropped(i) or s <= self.tau_expand:
                continue
            if self._cooling(e, "collapse"):
                continue
            out.append(_Cand(s, i, e))  # a gist in a valid WC exists, so its children do (append-only tree)
        return out

    def _collapse_cands(
        self,
        wc: WorkingContext,
        smap: Mapping[Entry, float] | None,
        *,
        need_scores: bool,
        honour_protection: bool = True,
        honour_cooldown: bool = True,
    ) -> list[_Cand]:
        out = []
        k = wc.block_size
        ents = wc.entries
        limit = wc.num_tokens - self.protect_tokens if self.protect_tokens > 0 else None
        check_cool = honour_cooldown and bool(self._born)
        for i, e in enumerate(ents):
            if e.level > 0 and e.index % k:
                continue
            group = wc.collapse_size(i)
            if not group:
                continue
            members = ents[i : i + group]
            if honour_protection and limit is not None and members[-1].end(k) > limit:
                continue
            if check_cool and any(m in self._born and self._cooling(m, "expand") for m in members):
                continue
            if smap is None:
                score = 0.0
            else:
                vals = [smap.get(m) for m in members]
                known = [v for v in vals if v is not None]
                if need_scores and len(known) != group:
                    continue
                score = self._group_value(e, known, k)
            out.append(_Cand(score, i, e, group))
        return out

    def _group_value(self, first: Entry, known: list[float], k: int) -> float:
        """What keeping a collapse group (starting with ``first``; ``known`` = its members' scores) is worth."""
        if first.level > 0 and self.group_score == "parent":
            kept = self._expanded_at.get(first.parent(k))
            if kept is not None:
                return kept
        if not known:
            return 0.0
        return max(known) if self.group_score == "max" else sum(known) / len(known)

    def _churns(self, wc: WorkingContext, expand: _Cand, cols: list[_Cand], pay: _Cand | None) -> bool:
        """With ``group_score="parent"`` the expanded group keeps ``expand.score``; if that is the lowest keep-score
        left, the next block's arrival collapses it again (fit_to_budget takes the lowest): skip such expands.

        The guard applies even with room for the expand and the next block. Streaming never has that room (a
        budget-filling WC is full), but a question's settle does, and there the guard leaves those slots empty;
        letting them fill costs ``lensnet`` multi-key needles, whose own ranking fills them with distractors' values
        (docs/FINDINGS.md, *The churn guard at the settle*); ``guard_with_room = False`` (the session sets it during a
        settle from ``allocator.query_churn_guard``) lets them fill."""
        if self.group_score != "parent":
            return False
        k = wc.block_size
        if not self.guard_with_room and pay is None and wc.cost + (k - 1) + k <= wc.budget:
            return False
        rest = [c.score for c in cols if c is not pay]
        return bool(rest) and expand.score <= min(rest)

    def _pick(self, cands: list[_Cand], sign: float) -> _Cand:
        """Best candidate by ``sign * score`` (ties: newest first for expands, oldest first for collapses)."""
        order = sorted(cands, key=lambda c: (-sign * c.score, -sign * c.index))
        if not self.stochastic or len(order) == 1:
            return order[0]
        top = order[: self.top_k]
        logits = torch.tensor([sign * c.score for c in top], dtype=torch.float64) / self.temperature
        j = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=self.generator))
        return top[j]

    def _do_expand(self, wc: WorkingContext, c: _Cand) -> Edit:
        i = wc.entry_at(c.entry.start(wc.block_size))
        after = wc.expand(i)
        if self.group_score == "parent":
            self._expanded_at[c.entry] = c.score
        for a in after:
            self._born[a] = (self._step, "expand")
        self.stats.expands += 1
        return Edit("expand", i, (c.entry,), tuple(after), c.score)

    def _do_collapse(self, wc: WorkingContext, c: _Cand) -> Edit:
        i = wc.entry_at(c.entry.start(wc.block_size))
        before = tuple(wc.entries[i : i + c.group])
        parent = wc.collapse(i)
        self._expanded_at.pop(parent, None)
        self._born[parent] = (self._step, "collapse")
        self.stats.collapses += 1
        return Edit("collapse", i, before, (parent,), c.score)

    # ------------------------------------------------------------------ public
    def refocus(
        self, wc: WorkingContext, scores: torch.Tensor | Sequence[float] | Mapping[Entry, float]
    ) -> list[Edit]:
        """Apply up to ``max_edits`` legal edits driven by ``scores`` (one per entry, NaN = no opinion)."""
        smap = self._score_map(wc, scores)
        self._last_scores = dict(smap)
        self._step += 1
        k = wc.block_size
        edits: list[Edit] = []
        skip: set[Entry] = set()
        while len(edits) < self.max_edits:
            exps = self._expand_cands(wc, smap, skip)
            cols = self._collapse_cands(wc, smap, need_scores=True)
            vol = [c for c in cols if c.score < -self.tau_collapse]
            best_e = self._pick(exps, +1.0) if exps else None
            worst_c = self._pick(vol, -1.0) if vol else None
            if best_e is not None and (worst_c is None or best_e.score >= -worst_c.score):
                pay = None
                if wc.cost + k - 1 > wc.budget:
                    room = [
                        c
                        for c in cols
                        if c.score < best_e.score and not (c.index <= best_e.index < c.index + c.group)
                    ]
                    if not room or len(edits) + 2 > self.max_edits:
                        self.stats.skipped_no_room += 1
                        skip.add(best_e.entry)
                        continue
                    pay = self._pick(room, -1.0)
                if self._churns(wc, best_e, cols, pay):
                    skip.add(best_e.entry)
                    continue
                if pay is not None:
                    edits.append(self._do_collapse(wc, pay))
                edits.append(self._do_expand(wc, best_e))
                continue
            if worst_c is not None:
                edits.append(self._do_collapse(wc, worst_c))
                continue
            break
        self._born = {e: b for e, b in self._born.items() if self._step - b[0] <= self.cooldown}
        self.stats.refocuses += 1
        self.stats.last_edits = len(edits)
        self.stats.last_swap_rate = len(edits) / max(1, len(wc))
        self.stats.swap_rate_sum += self.stats.last_swap_rate
        self.stats.last_utilisation = wc.cost / wc.budget if wc.budget else 0.0
        return edits

    def fit_to_budget(self, wc: WorkingContext, scores: Mapping[Entry, float] | None = None) -> list[Edit]:
        """Collapse until ``cost <= budget``: unprotected, not cooling, lowest score, oldest first.

        Protection and cooldown are preferences here, not vetoes: the budget is hard.
        """
        smap = self._last_scores if scores is None else scores
        edits: list[Edit] = []
        while wc.cost > wc.budget:
            cands = self._collapse_cands(
                wc, smap, need_scores=False, honour_protection=False, honour_cooldown=False
            )
            if not cands:
                break

            def key(c: _Cand, ents: tuple[Entry, ...] = wc.entries) -> tuple[bool, bool, float, int]:
                members = ents[c.index : c.index + c.group]
                return (
                    self._protected(wc, members[-1]),
                    any(self._cooling(m, "expand") for m in members),
                    c.score,
                    c.index,
                )

            c = min(cands, key=key)
            edits.append(self._do_collapse(wc, c))
            self.stats.fit_collapses += 1
            self.stats.collapses -= 1
        return edits

    def advance(
        self, wc: WorkingContext, new_num_tokens: int, scores: Mapping[Entry, float] | None = None
    ) -> list[Entry]:
        """Grow ``wc`` to ``new_num_tokens`` and collapse (score-aware) until it fits; the WC stays legal."""
        return wc.advance(new_num_tokens, fit=lambda staged: self.fit_to_budget(staged, scores))

    def run_policy(
        self, wc: WorkingContext, policy: Any, tree: Any, context: Any = None
    ) -> tuple[WorkingContext, list[Edit]]:
        """One refocus step driven by a policy; truncation policies (``allows_drop``) rebuild their WC."""
        if getattr(policy, "allows_drop", False):
            return policy.build(tree, wc.budget, depth=wc.depth), []
        scores = policy.scores(wc, tree, context)
        return wc, self.refocus(wc, scores)
