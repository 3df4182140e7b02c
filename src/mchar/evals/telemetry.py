"""Focus telemetry: how a policy spends its budget over time (swap rate, residency, utilisation, LODs, map).

Why a recorder outside the allocator: truncation baselines rebuild their working context (WC) instead of editing
it, so the allocator's own counters see nothing for them. Comparing consecutive WC *snapshots* measures every
policy the same way:

* ``swap_rate``: per refocus, the share of the previous WC's entries in view (not dropped) that are no longer
  in view (expanded, collapsed or dropped), averaged over refocuses. Dropped entries do not count: how a
  truncation baseline books the history it dropped (LOD1 entries that merge into a dropped LOD2 once it exists)
  changes nothing the model sees, and counting it made truncation's swap rate depend on ``tree.depth``.
* ``residency``: mean number of consecutive snapshots an entry in view (level, index) stays in view unchanged; an
  entry still alive at the end counts what it had (right-censored, so residency is a lower bound).
* ``budget_util``: mean ``cost / budget`` over snapshots.
* ``raw_tokens`` / ``gist_slots``: mean raw tokens (LOD0 blocks and the tail) and mean gist entries in the WC per
  snapshot. A cover spends slots on gists and leaves slack below the budget that a raw tail of whole blocks cannot
  fill; these two show what that costs against truncation, which holds ``budget`` raw tokens.
* ``scored_raw_tokens`` / ``scored_gist_slots``: the same two, but only over the WCs the *scored* tokens are
  predicted from (one per scored chunk, taken just before it is scored). The stream-wide means above include the
  start of a document, where history is shorter than the budget; these are what a ΔNLL compares.
* ``lod_histogram``: mean share of history tokens held at each LOD (``"dropped"`` for truncated history).
* focus map: int8 ``[snapshots, tokens]`` with the LOD of every position at every snapshot; ``-1`` = dropped,
  ``-2`` = not yet seen.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

DROPPED = -1
UNSEEN = -2

EntryKey = tuple[int, int]
# the focus metrics logged per policy (``focus/<policy>/<key>``), with their report column titles
FOCUS_METRICS = {
    "swap_rate": "swap rate",
    "budget_util": "budget util",
    "residency": "residency",
    "raw_tokens": "raw tokens",
    "gist_slots": "gist slots",
    "scored_raw_tokens": "raw tokens (scored)",
    "scored_gist_slots": "gist slots (scored)",
}
# the per-snapshot means a summary holds besides the LOD histogram
NUMBERS = (*FOCUS_METRICS, "snapshots")


def position_lods(wc: Any, num_tokens: int | None = None) -> np.ndarray:
    """LOD of every token position the WC covers (tail = 0, dropped = -1), length ``wc.num_tokens``."""
    t = int(wc.num_tokens if num_tokens is None else num_tokens)
    out = np.zeros(t, dtype=np.int8)
    if len(wc):
        levels = np.asarray(wc.levels(), dtype=np.int8)
        dropped = np.asarray(wc.dropped, dtype=bool)
        levels = np.where(dropped, np.int8(DROPPED), levels)
        widths = np.asarray(wc.widths(), dtype=np.int64)
        covered = int(widths.sum())
        out[:covered] = np.repeat(levels, widths)
    return out


class FocusRecorder:
    """Accumulates snapshots of one session's WC; ``map_tokens`` > 0 also records a focus map of that width."""

    def __init__(self, budget: int, map_tokens: int = 0) -> None:
        self.budget = int(budget)
        self.map_tokens = int(map_tokens)
        self.snapshots = 0
        self._swap: list[float] = []
        self._util: list[float] = []
        self._raw: list[int] = []
        self._gists: list[int] = []
        self._scored_raw: list[int] = []
        self._scored_gists: list[int] = []
        self._lod_share: dict[str, float] = defaultdict(float)
        self._alive: dict[EntryKey, int] = {}
        self._lifetimes: list[int] = []
        self._rows: list[np.ndarray] = []
        self._times: list[int] = []

    def observe(self, wc: Any) -> None:
        """Record the WC as it is now (call after every refocus)."""
        current = {(int(e.level), int(e.index)) for e, d in zip(wc.entries, wc.dropped, strict=True) if not d}
        if self._alive:
            gone = [k for k in self._alive if k not in current]
            self._swap.append(len(gone) / max(1, len(self._alive)))
            for k in gone:
                self._lifetimes.append(self._alive.pop(k))
        for k in current:
            self._alive[k] = self._alive.get(k, 0) + 1
        self._util.append(wc.cost / self.budget if self.budget else 0.0)
        raw, gists = _view(wc)
        self._raw.append(raw)
        self._gists.append(gists)
        t = int(wc.num_tokens)
        lods = position_lods(wc)
        if t:
            values, counts = np.unique(lods, return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist(), strict=True):
                self._lod_share["dropped" if v == DROPPED else str(v)] += c / t
        if self.map_tokens:
            row = np.full(self.map_tokens, UNSEEN, dtype=np.int8)
            row[: min(lods.size, self.map_tokens)] = lods[: self.map_tokens]
            self._rows.append(row)
            self._times.append(t)
        self.snapshots += 1

    def observe_scored(self, wc: Any) -> None:
        """Record what the next scored chunk is predicted from (call just before scoring it)."""
        raw, gists = _view(wc)
        self._scored_raw.append(raw)
        self._scored_gists.append(gists)

    def summary(self) -> dict[str, Any]:
        """Telemetry numbers (floats) and the mean LOD histogram of this recorder."""
        lifetimes = self._lifetimes + list(self._alive.values())
        n = max(1, self.snapshots)
        return {
            "swap_rate": _mean(self._swap),
            "residency": _mean(lifetimes),
            "budget_util": _mean(self._util),
            "raw_tokens": _mean(self._raw),
            "gist_slots": _mean(self._gists),
            "scored_raw_tokens": _mean(self._scored_raw),
            "scored_gist_slots": _mean(self._scored_gists),
            "snapshots": float(self.snapshots),
            "lod_histogram": {k: v / n for k, v in sorted(self._lod_share.items())},
        }

    def focus_map(self) -> np.ndarray:
        """``[snapshots, map_tokens]`` int8 LOD map (empty when no map was requested)."""
        if not self._rows:
            return np.zeros((0, self.map_tokens), dtype=np.int8)
        return np.stack(self._rows)

    def map_times(self) -> np.ndarray:
        """History length at every focus-map row."""
        return np.asarray(self._times, dtype=np.int64)


def _mean(values: list[float] | list[int]) -> float:
    """Mean of a recorder series, 0.0 when nothing was observed."""
    return float(np.mean(values)) if values else 0.0


def _view(wc: Any) -> tuple[int, int]:
    """Raw tokens (LOD0 blocks and the tail) and gist entries the base sees in ``wc``."""
    gists = sum(n for level, n in wc.lod_histogram().items() if level > 0)
    return int(wc.telemetry()["raw_tokens"]), int(gists)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Average per-document telemetry into one per-policy record."""
    if not summaries:
        return {key: 0.0 for key in NUMBERS} | {"lod_histogram": {}}
    out: dict[str, Any] = {}
    for key in NUMBERS:
        out[key] = float(np.mean([s[key] for s in summaries]))
    hist: dict[str, float] = defaultdict(float)
    for s in summaries:
        for k, v in s["lod_histogram"].items():
            hist[k] += v / len(summaries)
    out["lod_histogram"] = dict(sorted(hist.items()))
    return out
