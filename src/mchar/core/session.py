"""MegaContextSession: streaming ingest, periodic refocus, scoring and KV-cached generation.

The frozen base only ever sees the working context (WC): raw runs of tokens at their true positions and gists
at their span's position (``position_mode``). Per-token work is bounded by the budget, never by the history:

* **KV reuse.** The session remembers what its cache holds as a list of *segments* (maximal raw runs
  ``(0, start, end)`` and gists ``(level, index, 0)``). Before every forward it diffs the segments the WC wants
  now against the cached ones, crops the ``DynamicCache`` to the common prefix (``first_difference`` at slot
  granularity: a raw run that merely grew, e.g. a tail that became a full block, stays cached) and feeds only
  the suffix. Decoding one token is therefore a 1-slot forward; an edit recomputes from the first edited slot.
* **Budget.** After every append the allocator brings the WC back under budget, so the cache never holds more
  than ``budget`` slots (plus the continuation while :meth:`score` runs).
* Upstream had no KV cache at all (every sampled token re-ran the whole WC) and trimmed the WC instead of
  collapsing it; both are fixed here.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mchar.core.entries import Entry
from mchar.core.policies import PolicyContext
from mchar.core.positions import check_mode, gist_position
from mchar.core.protocols import BaseLM

Segment = tuple[int, int, int]
"""(0, start, end) = raw tokens [start, end) at their true positions; (level, index, 0) = one gist slot."""


def _seg_len(seg: Segment) -> int:
    return seg[2] - seg[1] if seg[0] == 0 else 1


def common_prefix_slots(cached: Sequence[Segment], wanted: Sequence[Segment]) -> int:
    """Number of leading slots that ``cached`` and ``wanted`` share (same content at the same position)."""
    n = 0
    for a, b in zip(cached, wanted, strict=False):
        if a == b:
            n += _seg_len(a)
            continue
        if a[0] == 0 and b[0] == 0 and a[1] == b[1]:
            n += min(a[2], b[2]) - a[1]
        break
    return n


@dataclass
class SessionStats:
    """Counters and timers (seconds) that the decode benchmark and telemetry read."""

    fed_slots: list[int] = field(default_factory=list)
    refocuses: int = 0
    edits: int = 0
    max_wc_slots: int = 0
    times: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def reset(self) -> None:
        self.fed_slots.clear()
        self.refocuses = self.edits = self.max_wc_slots = 0
        self.times.clear()


QUERY_REBUILDS = ("off", "recent", "coarsest")  # what a settle starts from: the stream's WC, or a fresh one


class MegaContextSession:
    """A frozen base LM with a MegaContext memory: ``ingest``, ``refocus``, ``score``, ``generate``.

    ``tree`` is a :class:`~mchar.core.tree.MegaContextTree` (or anything with the same ``ingest / num_tokens /
    tokens / gists / block_size`` surface); ``allocator`` turns policy scores into legal edits; ``policy`` is a
    score source (see :mod:`mchar.core.policies`). ``reuse_cache=False`` recomputes the whole WC on every forward
    (the reference the KV-reuse path is tested against).
    """

    def __init__(
        self,
        base: BaseLM,
        tree: Any,
        allocator: Any,
        policy: Any,
        budget: int,
        refocus_every: int | None = None,
        position_mode: str = "centre",
        reuse_cache: bool = True,
        profile: bool = False,
        query_rounds: int = 1,
        query_cooldown: int | None = None,
        query_policy: Any = None,
        query_rebuild: str = "off",
        query_tau_expand: float | None = None,
        query_churn_guard: bool = True,
    ) -> None:
        check_mode(position_mode)
        if query_rebuild not in QUERY_REBUILDS:
            raise ValueError(
                f"allocator.query_rebuild must be one of {QUERY_REBUILDS}, got {query_rebuild!r}"
            )
        if int(query_rounds) < 1:
            raise ValueError(f"allocator.query_rounds must be >= 1, got {query_rounds}")
        if query_cooldown is not None and int(query_cooldown) < 0:
            raise ValueError(f"allocator.query_cooldown must be >= 0, got {query_cooldown}")
        if query_tau_expand is not None and not math.isfinite(float(query_tau_expand)):
            raise ValueError(
                f"allocator.query_tau_expand must be a finite number or None, got {query_tau_expand}"
            )
        self.base, self.tree, self.allocator, self.policy = base, tree, allocator, policy
        self.budget = int(budget)
        self.block_size: int = int(tree.block_size)
        self.refocus_every = int(refocus_every or self.block_size)
        self.position_mode = position_mode
        self.reuse_cache = reuse_cache
        self.profile = profile
        self.query_rounds = int(query_rounds)
        self.query_cooldown = None if query_cooldown is None else int(query_cooldown)
        self.query_policy = query_policy
        self.query_rebuild = str(query_rebuild)
        self.query_tau_expand = None if query_tau_expand is None else float(query_tau_expand)
        self.query_churn_guard = bool(query_churn_guard)
        self.stats = SessionStats()
        self._wc: Any = _initial_context(allocator, policy, tree, self.budget)
        self._since_refocus = 0
        self._last_refocus_edits = 0
        self._cache: Any = None
        self._cached: list[Segment] = []
        self._cached_slots = 0
        self._cached_version: Any = None
        self._last_logits: torch.Tensor | None = None
        self._last_logits_at = -1
        self.future_tokens: torch.Tensor | None = None  # only the oracle policy reads it (eval)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def num_tokens(self) -> int:
        return int(self.tree.num_tokens)

    @property
    def wc(self) -> Any:
        """The working context, advanced to the whole history (see :meth:`ingest` for the lazy tail)."""
        if self._wc.num_tokens < self.num_tokens:
            _grow(self)
        return self._wc

    @wc.setter
    def wc(self, value: Any) -> None:
        self._wc = value

    @contextmanager
    def _timed(self, name: str):  # noqa: ANN202 - a context manager
        if self.profile and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.profile and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stats.times[name] += time.perf_counter() - t0

    def segments(self) -> list[Segment]:
        """What the base should see now, as merged raw runs and gist slots (dropped entries are skipped)."""
        k = self.block_size
        segs: list[Segment] = []
        pairs = _live_entries(self._wc)  # tokens beyond it are the (lazy) raw tail run
        for e, dropped in pairs:
            if dropped:
                continue
            if e.level == 0:
                s, t = e.start(k), e.end(k)
                if segs and segs[-1][0] == 0 and segs[-1][2] == s:
                    segs[-1] = (0, segs[-1][1], t)
                else:
                    segs.append((0, s, t))
            else:
                segs.append((e.level, e.index, 0))
        tail_start = pairs[-1][0].end(k) if pairs else 0
        total = self.num_tokens
        if total > tail_start:
            if segs and segs[-1][0] == 0 and segs[-1][2] == tail_start:
                segs[-1] = (0, segs[-1][1], total)
            else:
                segs.append((0, tail_start, total))
        return segs

    def _materialise(self, segs: Sequence[Segment], skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds [1, S, d] and position_ids [1, S] for the slots of ``segs`` after the first ``skip``."""
        k = self.block_size
        device = getattr(self.base, "device", None)
        pieces: list[tuple[str, Any]] = []  # ("ids", (start, end)) or ("gists", (level, first, last))
        for seg in segs:
            n = _seg_len(seg)
            if skip >= n:
                skip -= n
                continue
            if seg[0] == 0:
                pieces.append(("ids", (seg[1] + skip, seg[2])))
            else:
                last = pieces[-1] if pieces else None
                if last and last[0] == "gists" and last[1][0] == seg[0] and last[1][2] == seg[1]:
                    pieces[-1] = ("gists", (seg[0], last[1][1], seg[1] + 1))
                else:
                    pieces.append(("gists", (seg[0], seg[1], seg[1] + 1)))
            skip = 0
        embeds, positions = [], []
        for kind, (a, b, *rest) in pieces:
            if kind == "ids":
                ids = self.tree.tokens(a, b)
                embeds.append(self.base.embed(torch.as_tensor(ids, dtype=torch.long).reshape(1, -1))[0])
                positions.append(torch.arange(a, b))
            else:
                level, first, last = a, b, rest[0]
                embeds.append(self.tree.gists(level, first, last))
                width = k**level
                positions.append(
                    torch.tensor(
                        [
                            gist_position(i * width, (i + 1) * width, self.position_mode)
                            for i in range(first, last)
                        ]
                    )
                )
        ref = embeds[0] if embeds else self.base.embed(torch.zeros(1, 1, dtype=torch.long))[0]
        dev = device if device is not None else ref.device
        x = torch.cat([e.to(device=dev, dtype=ref.dtype) for e in embeds]) if embeds else ref[:0]
        pos = torch.cat(positions).to(dev) if positions else torch.zeros(0, dtype=torch.long, device=dev)
        return x.unsqueeze(0), pos.unsqueeze(0)

    def _forward(self, segs: list[Segment]) -> torch.Tensor:
        """Bring the cache in line with ``segs`` (crop + feed the suffix) and return logits of the fed slots."""
        total = sum(_seg_len(s) for s in segs)
        version = getattr(self.tree, "gist_version", None)
        keep = 0
        if self.reuse_cache and self._cache is not None and version == self._cached_version:
            keep = common_prefix_slots(self._cached, segs)
        if keep == total and self._last_logits_at == total:
            self._cached, self._cached_slots = segs, total
            return self._last_logits.unsqueeze(0)  # type: ignore[union-attr]
        keep = min(keep, total - 1)
        with self._timed("assemble"):
            x, pos = self._materialise(segs, keep)
        cache = None
        if keep > 0:
            cache = self._cache
            _crop(cache, keep)
        with self._timed("base"), torch.no_grad():
            logits, cache = self.base.forward_embeds(x, pos, past_key_values=cache, use_cache=True)
        if int(cache.get_seq_length()) != total:  # the cache must mirror the WC slot for slot
            raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, the WC has {total} slots")
        self.stats.fed_slots.append(int(x.shape[1]))
        self.stats.max_wc_slots = max(self.stats.max_wc_slots, total)
        self._cache, self._cached, self._cached_slots, self._cached_version = cache, segs, total, version
        self._last_logits, self._last_logits_at = logits[0, -1], total
        return logits[0]

    def next_token_logits(self) -> torch.Tensor:
        """Logits [V] for the token after the current history (uses and updates the KV cache)."""
        if self.num_tokens == 0:
            raise ValueError("the session is empty: ingest at least one token first")
        return self._forward(self.segments())[-1]

    def context_logits(self) -> torch.Tensor:
        """Logits [W, V] of every WC slot in one uncached forward (for checks against the plain base)."""
        x, pos = self._materialise(self.segments(), 0)
        with torch.no_grad():
            logits, _ = self.base.forward_embeds(x, pos, past_key_values=None, use_cache=False)
        return logits[0]

    # ------------------------------------------------------------------ memory updates

    def ingest(self, tokens: Iterable[int] | torch.Tensor) -> None:
        """Append tokens to the history: grow the tree, advance the WC, keep it legal, refocus every K tokens.

        The WC is advanced lazily: while the new tokens fit in the budget they are simply a longer raw tail (the
        same slots an eager advance would produce), and the O(#entries) ``allocator.advance`` only runs when the
        budget would be exceeded, at a refocus, or when :attr:`wc` is read. Per-token work stays O(1) between.
        """
        ids = torch.as_tensor(tokens if isinstance(tokens, torch.Tensor) else list(tokens), dtype=torch.long)
        ids = ids.reshape(-1).cpu()
        if ids.numel() == 0:
            return
        with self._timed("tree"):
            self.tree.ingest(ids)
        with self._timed("allocator"):
            _advance(self, int(ids.numel()))
        self._since_refocus += int(ids.numel())
        if self._since_refocus >= self.refocus_every:
            self.refocus()

    def refocus(self) -> int:
        """Score entries with the policy and apply the allocator's legal edits; returns the number of edits."""
        self._since_refocus = 0
        if not self.wc.entries:
            return 0
        with self._timed("refocus"):
            edits = _refocus(self)
        self.stats.refocuses += 1
        self.stats.edits += edits
        self._last_refocus_edits = edits
        return edits

    def refocus_pending(self) -> int:
        """Settle the focus on the question before answering: refocus (if tokens arrived since the last refocus)
        up to ``query_rounds`` times, stopping at the first round without edits; returns the edits made.

        The question usually lands between two periodic refocuses, and a query-driven policy can only fetch what
        it asks for after seeing it. One round cannot reach a needle under a coarse gist: the children an expand
        creates carry no score until the next round, so walking LOD2 -> LOD1 -> raw takes two or more. Each round
        costs one policy pass over at most ``budget`` entries, so answering stays constant-cost in the history.
        ``query_cooldown`` (when set) replaces the allocator's cooldown for these rounds: the cooldown damps
        streaming oscillation, but here it vetoes the walk back to a block collapsed moments earlier, and a round
        whose only wanted edit is vetoed has no edits, which ends the settle. ``query_policy`` (when set) scores
        these rounds instead of the streaming policy (:class:`~mchar.core.policies.QueryBlendPolicy`).
        ``query_rebuild`` starts a query-driven settle (one with a ``query_policy``) from a fresh WC instead of the
        stream's (``coarsest``: the coarsest cover and the protected tail; ``recent``: that cover with the newest gists
        expanded, as a session starts): what streaming left raw (say, the values of needles worded like the asked one,
        or recent blocks that do not answer the question) must earn its slot again under the settle's scores (one base
        pass over at most ``budget`` slots, so still constant-cost). ``query_tau_expand`` (when set) replaces the
        allocator's expand threshold for these rounds: a budget-filling allocator expands any gist into a free slot,
        and at the question the free slots go to the needles worded like the asked one; a threshold on the settle's
        z-scores opens only what stands out and leaves the rest of the budget unused. ``query_churn_guard=False``
        lets a parent-scored allocator fill the slots its churn guard keeps free where nothing will be collapsed
        before the answer (the ablation of docs/FINDINGS.md, *The churn guard at the settle*).
        """
        streaming_cooldown = getattr(self.allocator, "cooldown", None)
        streaming_tau = getattr(self.allocator, "tau_expand", None)
        streaming_policy = self.policy
        streaming_guard = getattr(self.allocator, "guard_with_room", None)
        if streaming_guard is not None:
            self.allocator.guard_with_room = self.query_churn_guard
        if self.query_cooldown is not None and streaming_cooldown is not None:
            self.allocator.cooldown = self.query_cooldown
        if self.query_tau_expand is not None and streaming_tau is not None:
            self.allocator.tau_expand = self.query_tau_expand
        if self.query_policy is not None:
            self.policy = self.query_policy
        try:
            # only a query-driven settle starts afresh: a policy that settles as it streams (a fixed cover, truncation)
            # could not walk back from the coarsest cover in a few rounds
            rebuild = self.query_rebuild != "off" and self.query_policy is not None and bool(self.wc.entries)
            if rebuild:
                recent = self.query_rebuild == "recent"
                self._wc = _initial_context(self.allocator, self.policy, self.tree, self.budget, recent)
            pending = bool(self._since_refocus) or rebuild
            # without pending tokens the last periodic refocus already saw the whole question: it was round one
            edits = self.refocus() if pending else self._last_refocus_edits
            total = edits if pending else 0
            for _ in range(self.query_rounds - 1):
                if not edits:
                    break
                edits = self.refocus()
                total += edits
        finally:
            self.policy = streaming_policy
            if streaming_guard is not None:
                self.allocator.guard_with_room = streaming_guard
            if streaming_cooldown is not None:
                self.allocator.cooldown = streaming_cooldown
            if streaming_tau is not None:
                self.allocator.tau_expand = streaming_tau
        return total

    # ------------------------------------------------------------------ scoring and decoding

    def score(
        self, continuation_ids: Sequence[int] | torch.Tensor, commit: bool = False
    ) -> tuple[float, torch.Tensor]:
        """Sum log-likelihood and per-token log-probs [n] of ``continuation_ids`` given the current history.

        ``commit=False`` (default) leaves history untouched: the continuation is scored as raw tokens appended
        after the current WC (the lm-eval ``loglikelihood`` setting) and the cache is cropped back afterwards.
        ``commit=True`` streams it through :meth:`ingest` chunk by chunk (WC refocus between chunks), so long
        continuations stay within budget, and keeps it in history.
        """
        ids = (
            torch.as_tensor(
                continuation_ids if isinstance(continuation_ids, torch.Tensor) else list(continuation_ids),
                dtype=torch.long,
            )
            .reshape(-1)
            .cpu()
        )
        if ids.numel() == 0:
            return 0.0, torch.zeros(0)
        if commit:
            out = []
            step = self.refocus_every
            for c in range(0, ids.numel(), step):
                chunk = ids[c : c + step]
                out.append(self._score_chunk(chunk, keep=True))
                self.ingest(chunk)
            lp = torch.cat(out)
        else:
            lp = self._score_chunk(ids)
        return float(lp.sum()), lp

    def _score_chunk(self, ids: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """Log-probs of ``ids`` right after the current history.

        ``keep=False`` crops the cache back to the WC; ``keep=True`` leaves the fed tokens cached as a raw run
        (they are about to be ingested, so the next forward reuses them instead of recomputing).
        """
        if self.num_tokens == 0:
            raise ValueError("score: the session is empty; ingest a context (at least one token) first")
        segs = self.segments()
        first = self._forward(segs)[-1]
        wc_slots = self._cached_slots
        t = self.num_tokens
        lp_first = torch.log_softmax(first.float(), -1)[ids[0]].reshape(1)
        if ids.numel() == 1:
            return lp_first.cpu()
        rest = ids[:-1]
        x = self.base.embed(rest.reshape(1, -1).to(getattr(self.base, "device", rest.device)))
        pos = torch.arange(t, t + rest.numel(), device=x.device).unsqueeze(0)
        with self._timed("base"), torch.no_grad():
            logits, cache = self.base.forward_embeds(x, pos, past_key_values=self._cache, use_cache=True)
        self.stats.fed_slots.append(int(rest.numel()))
        if keep:
            run = (0, t, t + rest.numel())
            if segs and segs[-1][0] == 0 and segs[-1][2] == t:
                run = (0, segs[-1][1], t + rest.numel())
                segs = segs[:-1]
            self._cached, self._cached_slots = [*segs, run], wc_slots + rest.numel()
            self._last_logits, self._last_logits_at = logits[0, -1], self._cached_slots
        else:
            _crop(cache, wc_slots)
        self._cache = cache
        lps = torch.log_softmax(logits[0].float(), -1).gather(-1, ids[1:].to(logits.device).unsqueeze(-1))
        return torch.cat([lp_first.cpu(), lps[:, 0].cpu()])

    def generate(
        self,
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_ids: Iterable[int] = (),
    ) -> list[int]:
        """Decode up to ``max_new_tokens`` tokens, appending each to history (stops after a stop id)."""
        stops = set(int(s) for s in stop_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.next_token_logits().float().cpu()
            tok = _pick(logits, greedy, temperature, top_k, gen)
            out.append(tok)
            self.ingest([tok])
            if tok in stops:
                break
        return out


def _crop(cache: Any, keep: int) -> None:
    """Keep the first ``keep`` cached positions; a negative argument means "remove this many" both in the old
    (``crop(max_length)``) and the new (``crop(tokens_to_remove)``) transformers cache API."""
    remove = int(cache.get_seq_length()) - keep
    if remove > 0:
        cache.crop(-remove)


def _pick(
    logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> int:
    if greedy or temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


# ---------------------------------------------------------------------- glue to the WC / allocator / policy
# Kept in small functions so the session reads the other modules' public API in exactly one place.


def _live_entries(wc: Any) -> list[tuple[Entry, bool]]:
    dropped = getattr(wc, "dropped", None) or (False,) * len(wc.entries)
    return list(zip(wc.entries, dropped, strict=True))


def _initial_context(allocator: Any, policy: Any, tree: Any, budget: int, expand_recent: bool = True) -> Any:
    """A fresh legal WC for everything in ``tree`` (truncation policies build their own): the coarsest cover with
    the newest gists expanded while they fit (``expand_recent``), or the coarsest cover alone."""
    if getattr(policy, "allows_drop", False):
        return policy.build(tree, budget, depth=tree.depth)
    return allocator.initial_context(tree, budget, expand_recent=expand_recent)


def _advance(session: MegaContextSession, new_tokens: int) -> None:
    """Grow the WC to the tree's length when it must; a large jump (a prompt) rebuilds it instead of collapsing
    one group at a time."""
    t = session.num_tokens
    wc = session._wc
    pending = t - wc.num_tokens
    if new_tokens >= session.budget or not wc.entries and t > session.budget:
        session._wc = _initial_context(session.allocator, session.policy, session.tree, session.budget)
    elif wc.cost + pending > session.budget:
        _grow(session)


def _grow(session: MegaContextSession) -> None:
    """Advance the WC to the tree's length. A truncation baseline that no longer fits rebuilds its window (the
    oldest block leaves the view) rather than letting the allocator collapse that block into a gist: between two
    refocuses (while an answer is generated) it held a LOD1 gist no truncation has."""
    wc, t = session._wc, session.num_tokens
    if getattr(session.policy, "allows_drop", False) and wc.cost + (t - wc.num_tokens) > session.budget:
        session._wc = _initial_context(session.allocator, session.policy, session.tree, session.budget)
    else:
        session.allocator.advance(wc, t)


def _refocus(session: MegaContextSession) -> int:
    """One policy + allocator step; returns the number of edits (a truncation rebuild counts as one)."""
    before = session.wc
    context = PolicyContext(
        base_lm=session.base, future_tokens=session.future_tokens, position_mode=session.position_mode
    )
    wc, edits = session.allocator.run_policy(session.wc, session.policy, session.tree, context)
    session.wc = wc
    return len(edits) if wc is before else int(wc != before)
