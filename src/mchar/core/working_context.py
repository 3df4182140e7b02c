"""The working context (WC): the only thing the frozen base model ever sees.

A WC is an ordered list of :class:`~mchar.core.entries.Entry` that tiles ``[0, n_full*K)`` with no gap or
overlap, followed by the raw tail ``[n_full*K, T)`` (the incomplete newest block). A raw block costs K, a gist
costs 1, the tail costs its length. Why it is built this way (upstream defects it must not repeat):

* **The budget is hard.** ``cost <= budget`` is re-checked after every public mutation; an edit that would break it
  raises :class:`BudgetExceeded` and leaves the WC unchanged. Nothing is ever trimmed: upstream silently dropped
  the oldest entries whenever its soft length was exceeded, so coverage quietly shrank.
* **Collapses are aligned.** K siblings collapse only if the first has ``index % K == 0`` and all K are present,
  contiguous, at the same level (upstream looked parents up with unaligned positions).
* **Truncation is explicit.** Baselines that drop history (recency, StreamingLLM) mark entries *dropped*: cost 0,
  not fed to the model, but still tiling, so the loss is visible and counted. Only a WC created with
  ``allows_drop=True`` accepts drops.
* **Failed edits change nothing.** Every check runs before the mutation; :meth:`advance` works on a staged copy.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mchar.core.entries import Entry
from mchar.core.positions import check_mode, gist_positions


class WorkingContextError(ValueError):
    """Base class: a working-context operation was refused (the WC is unchanged)."""


class IllegalEdit(WorkingContextError):
    """An edit that breaks tiling, alignment, level or tree consistency."""


class BudgetExceeded(IllegalEdit):
    """An edit (or a context) that would cost more than the budget allows."""


@dataclass(frozen=True)
class SlotMap:
    """What each WC slot (one row of ``inputs_embeds``) is.

    ``entry_index`` is the WC entry (-1 for the raw tail), ``levels`` the node level (0 for raw tokens), and
    ``node_index`` the tree node index: raw tokens map to token nodes ``(0, t)``, gists to ``(level, index)``.
    Indexing yields ``(level, node_index)`` tuples, so it also reads as a plain list of slot nodes.
    """

    entry_index: torch.Tensor
    levels: torch.Tensor
    node_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.levels.numel())

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.levels[i]), int(self.node_index[i])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self.levels.tolist(), self.node_index.tolist(), strict=True))

    def nodes(self) -> list[tuple[int, int]]:
        return list(self)


def node_exists(entry: Entry, block_size: int, depth: int, num_tokens: int, tree: Any = None) -> bool:
    """Whether the tree holds ``entry``: full blocks only, parents only once all K children exist."""
    if entry.index < 0 or entry.level < 0 or entry.level > depth:
        return False
    if entry.end(block_size) > num_tokens:
        return False
    if tree is None:
        return True
    if entry.level > int(tree.depth):
        return False
    if entry.level == 0:
        return entry.end(block_size) <= int(tree.num_tokens)
    return entry.index < int(tree.num_nodes(entry.level))


def coarsest_cover(
    block_size: int,
    depth: int,
    num_tokens: int,
    tree: Any = None,
    start_block: int = 0,
    end_block: int | None = None,
) -> list[Entry]:
    """The cheapest legal tiling of complete blocks ``[start_block, end_block)`` (default: all of them): at each
    aligned position the coarsest existing node that fits inside the range."""
    k = block_size
    n_full = num_tokens // k if end_block is None else min(end_block, num_tokens // k)
    out: list[Entry] = []
    b = start_block
    while b < n_full:
        for level in range(depth, -1, -1):
            w = k ** max(level - 1, 0)  # width in blocks
            if b % w == 0 and b + w <= n_full:
                e = Entry(level, b // w)
                if node_exists(e, k, depth, num_tokens, tree):
                    out.append(e)
                    b += w
                    break
        else:  # pragma: no cover - level 0 always exists for a complete block
            raise AssertionError(f"no node covers block {b}")
    return out


def min_cost(block_size: int, depth: int, num_tokens: int, tree: Any = None) -> int:
    """The smallest budget any non-dropping WC over ``num_tokens`` tokens can have."""
    cover = coarsest_cover(block_size, depth, num_tokens, tree)
    return sum(e.cost(block_size) for e in cover) + num_tokens % block_size


def stream_min_cost(block_size: int, depth: int, num_tokens: int, then_each: int = 0) -> int:
    """The budget a non-dropping session needs to stream ``num_tokens`` tokens in whole blocks (a block-aligned
    :func:`min_cost` at each block boundary, and at the end), then ``then_each`` more one at a time (generation).

    A cover's cost is not monotone in the length (at K = 16, depth 2: 1,008 tokens cost 3 LOD2 + 15 LOD1 gists, 1,088
    cost 4 + 4), so a stream can outgrow a budget its final length fits. Closed form, vectorised over the lengths:
    the raw tail, each level below the top modulo K, and every top-level node."""
    k = block_size
    t = np.concatenate(
        [np.arange(k, num_tokens + 1, k), np.arange(num_tokens, num_tokens + then_each + 1)]
    ).astype(np.int64)
    t = t[t > 0]
    if not t.size:
        return 0
    cost = t % k + t // k**depth
    for level in range(1, depth):
        cost += (t // k**level) % k
    return int(cost.max())


FitFn = Callable[["WorkingContext"], None]


class WorkingContext:
    """Entries tiling ``[0, n_full*K)`` plus the raw tail ``[n_full*K, T)``, with ``cost <= budget`` always."""

    def __init__(
        self,
        block_size: int,
        depth: int,
        budget: int,
        num_tokens: int = 0,
        entries: Sequence[Entry] | None = None,
        dropped: Sequence[bool] | None = None,
        allows_drop: bool = False,
        tree: Any = None,
        strict: bool = False,
    ) -> None:
        """``entries=None`` means every complete block raw. ``tree`` (optional, anything with ``num_tokens`` and
        ``num_nodes(level)``) adds a tree-consistency check to every edit; ``strict`` re-runs the full
        :meth:`validate` after every mutation (tests)."""
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        self.block_size = int(block_size)
        self.depth = int(depth)
        self.budget = int(budget)
        self.allows_drop = bool(allows_drop)
        self.tree = tree
        self.strict = bool(strict)
        self._num_tokens = int(num_tokens)
        n_full = self._num_tokens // self.block_size
        self._entries: list[Entry] = (
            list(entries) if entries is not None else [Entry(0, b) for b in range(n_full)]
        )
        self._dropped: list[bool] = list(dropped) if dropped is not None else [False] * len(self._entries)
        if len(self._dropped) != len(self._entries):
            raise IllegalEdit(f"dropped has {len(self._dropped)} flags for {len(self._entries)} entries")
        if any(self._dropped) and not self.allows_drop:
            raise IllegalEdit(
                "dropped entries need allows_drop=True (only truncation baselines drop history)"
            )
        self._cost = self._recompute_cost()
        self._staging = False
        self.validate()

    # ------------------------------------------------------------------ views
    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries)

    @property
    def dropped(self) -> tuple[bool, ...]:
        return tuple(self._dropped)

    @property
    def n_full(self) -> int:
        return self._num_tokens // self.block_size

    @property
    def tail_start(self) -> int:
        return self.n_full * self.block_size

    @property
    def tail_len(self) -> int:
        return self._num_tokens - self.tail_start

    @property
    def cost(self) -> int:
        return self._cost

    @property
    def num_slots(self) -> int:
        """Rows fed to the model (equals ``cost``: a raw block is K slots, a gist 1, dropped 0)."""
        return self._cost

    @property
    def num_dropped(self) -> int:
        return sum(self._dropped)

    @property
    def dropped_tokens(self) -> int:
        return sum(e.width(self.block_size) for e, d in zip(self._entries, self._dropped, strict=True) if d)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Entry:
        return self._entries[i]

    def is_dropped(self, i: int) -> bool:
        return self._dropped[i]

    def entry_cost(self, i: int) -> int:
        return 0 if self._dropped[i] else self._entries[i].cost(self.block_size)

    def levels(self) -> np.ndarray:
        return np.fromiter((e.level for e in self._entries), dtype=np.int64, count=len(self._entries))

    def starts(self) -> np.ndarray:
        k = self.block_size
        return np.fromiter((e.start(k) for e in self._entries), dtype=np.int64, count=len(self._entries))

    def widths(self) -> np.ndarray:
        k = self.block_size
        return np.fromiter((e.width(k) for e in self._entries), dtype=np.int64, count=len(self._entries))

    def entry_at(self, token: int) -> int:
        """Index of the entry covering ``token`` (-1 for the tail)."""
        if not 0 <= token < self._num_tokens:
            raise IndexError(f"token {token} outside [0, {self._num_tokens})")
        if token >= self.tail_start:
            return -1
        return bisect.bisect_right(self.starts().tolist(), token) - 1

    def lod_histogram(self) -> dict[int, int]:
        """Live (non-dropped) entries per level; the tail's tokens are reported under level 0 as raw blocks are."""
        hist: dict[int, int] = {}
        for e, d in zip(self._entries, self._dropped, strict=True):
            if not d:
                hist[e.level] = hist.get(e.level, 0) + 1
        return dict(sorted(hist.items()))

    def telemetry(self) -> dict[str, float]:
        """Budget utilisation and coverage numbers for logging."""
        k = self.block_size
        raw_tokens = sum(
            k for e, d in zip(self._entries, self._dropped, strict=True) if not d and e.level == 0
        )
        return {
            "cost": float(self._cost),
            "budget": float(self.budget),
            "utilisation": self._cost / self.budget if self.budget else 0.0,
            "entries": float(len(self._entries)),
            "dropped_entries": float(self.num_dropped),
            "dropped_tokens": float(self.dropped_tokens),
            "raw_tokens": float(raw_tokens + self.tail_len),
            "num_tokens": float(self._num_tokens),
        }

    # ------------------------------------------------------------------ equality / copy
    def _key(self) -> tuple[Any, ...]:
        return (
            self.block_size,
            self.depth,
            self.budget,
            self._num_tokens,
            self.allows_drop,
            tuple(self._entries),
            tuple(self._dropped),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorkingContext):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        hist = ", ".join(f"L{lv}:{n}" for lv, n in self.lod_histogram().items())
        return (
            f"WorkingContext(K={self.block_size}, depth={self.depth}, T={self._num_tokens}, "
            f"cost={self._cost}/{self.budget}, entries={len(self._entries)} [{hist}], "
            f"dropped={self.num_dropped}, tail={self.tail_len})"
        )

    def copy(self, budget: int | None = None) -> WorkingContext:
        """An independent copy (optionally with another budget, which must still hold)."""
        new = WorkingContext.__new__(WorkingContext)
        new.block_size, new.depth, new.allows_drop = self.block_size, self.depth, self.allows_drop
        new.budget = self.budget if budget is None else int(budget)
        new.tree, new.strict = self.tree, self.strict
        new._num_tokens, new._cost, new._staging = self._num_tokens, self._cost, False
        new._entries, new._dropped = list(self._entries), list(self._dropped)
        if new._cost > new.budget:
            raise BudgetExceeded(f"copy: cost {new._cost} exceeds the new budget {new.budget}")
        return new

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "depth": self.depth,
            "budget": self.budget,
            "num_tokens": self._num_tokens,
            "allows_drop": self.allows_drop,
            "entries": [[e.level, e.index] for e in self._entries],
            "dropped": list(self._dropped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], tree: Any = None) -> WorkingContext:
        return cls(
            data["block_size"],
            data["depth"],
            data["budget"],
            data["num_tokens"],
            entries=[Entry(int(lv), int(ix)) for lv, ix in data["entries"]],
            dropped=data["dropped"],
            allows_drop=data.get("allows_drop", False),
            tree=tree,
        )

    # ------------------------------------------------------------------ invariants
    def _recompute_cost(self) -> int:
        k = self.block_size
        return (
            sum(0 if d else e.cost(k) for e, d in zip(self._entries, self._dropped, strict=True))
            + self.tail_len
        )

    def _exists(self, e: Entry) -> bool:
        return node_exists(e, self.block_size, self.depth, self._num_tokens, self.tree)

    def validate(self, tree: Any = None) -> None:
        """Check every invariant (budget, contiguity, alignment, levels, tree consistency); raise on the first."""
        k = self.block_size
        tree = tree if tree is not None else self.tree
        pos = 0
        for i, e in enumerate(self._entries):
            if e.level < 0 or e.level > self.depth:
                raise IllegalEdit(f"entry {i} {e}: level outside [0, depth={self.depth}]")
            if e.index < 0:
                raise IllegalEdit(f"entry {i} {e}: negative index")
            start, end = e.span(k)
            if start != pos:
                kind = "gap" if start > pos else "overlap"
                raise IllegalEdit(
                    f"entry {i} {e}: {kind}: starts at token {start}, previous entry ended at {pos}"
                )
            if start % e.width(k) or end - start != e.width(k):  # alignment + level consistency
                raise IllegalEdit(f"entry {i} {e}: span [{start}, {end}) not aligned to its level")
            if not node_exists(e, k, self.depth, self._num_tokens, tree):
                raise IllegalEdit(f"entry {i} {e}: node not in the tree (T={self._num_tokens})")
            pos = end
        if pos != self.tail_start:
            raise IllegalEdit(f"entries end at token {pos}, but the raw tail starts at {self.tail_start}")
        if any(self._dropped) and not self.allows_drop:
            raise IllegalEdit("dropped entries in a WC without allows_drop")
        cost = self._recompute_cost()
        if cost != self._cost:
            raise IllegalEdit(f"internal cost {self._cost} != recomputed cost {cost}")
        if cost > self.budget and not self._staging:
            raise BudgetExceeded(f"cost {cost} exceeds budget {self.budget}")

    def _after_mutation(self, lo: int, hi: int) -> None:
        """Cheap local re-check after a splice of entries [lo, hi); full validate when strict."""
        if self._cost > self.budget and not self._staging:
            raise AssertionError(
                f"internal error: cost {self._cost} > budget {self.budget} after a checked edit"
            )
        k = self.block_size
        for j in range(max(lo, 1), min(hi + 1, len(self._entries))):
            if self._entries[j - 1].end(k) != self._entries[j].start(k):
                raise AssertionError(f"internal error: tiling broken between entries {j - 1} and {j}")
        if self.strict:
            self.validate()

    # ------------------------------------------------------------------ legality
    def _check_index(self, i: int, op: str) -> Entry:
        if not 0 <= i < len(self._entries):
            raise IllegalEdit(f"{op}({i}): no such entry (the WC has {len(self._entries)} entries)")
        if self._dropped[i]:
            raise IllegalEdit(f"{op}({i}): entry {self._entries[i]} is dropped")
        return self._entries[i]

    def expand_error(self, i: int) -> str | None:
        """Why ``expand(i)`` is illegal, or None if it is legal."""
        try:
            self._expand_plan(i)
        except WorkingContextError as err:
            return str(err)
        return None

    def collapse_error(self, i: int) -> str | None:
        """Why ``collapse(i)`` is illegal, or None if it is legal."""
        try:
            self._collapse_plan(i)
        except WorkingContextError as err:
            return str(err)
        return None

    def can_expand(self, i: int) -> bool:
        return self.expand_error(i) is None

    def can_collapse(self, i: int) -> bool:
        return self.collapse_error(i) is None

    def _expand_plan(self, i: int, check_budget: bool = True) -> list[Entry]:
        e = self._check_index(i, "expand")
        if e.level == 0:
            raise IllegalEdit(f"expand({i}): {e} is a raw block, it cannot be expanded")
        children = e.children(self.block_size)
        missing = [c for c in children if not self._exists(c)]
        if missing:
            raise IllegalEdit(f"expand({i}): children {missing[:2]} of {e} are not in the tree")
        new_cost = self._cost - 1 + sum(c.cost(self.block_size) for c in children)
        if check_budget and new_cost > self.budget:
            raise BudgetExceeded(f"expand({i}): cost would be {new_cost} > budget {self.budget}")
        return children

    def _collapse_plan(self, i: int) -> tuple[int, Entry]:
        """(number of entries replaced, parent)."""
        e = self._check_index(i, "collapse")
        k = self.block_size
        parent = e.parent(k)
        if parent.level > self.depth:
            raise IllegalEdit(f"collapse({i}): {e} is at the tree depth {self.depth}; there is no parent")
        if e.level == 0:
            group = 1
        else:
            if e.index % k:
                raise IllegalEdit(
                    f"collapse({i}): {e} is not the first of its K={k} siblings (index % K != 0)"
                )
            group = k
            if i + k > len(self._entries):
                raise IllegalEdit(
                    f"collapse({i}): only {len(self._entries) - i} entries from {e}, need K={k}"
                )
            for j in range(1, k):
                want = Entry(e.level, e.index + j)
                if self._entries[i + j] != want:
                    raise IllegalEdit(
                        f"collapse({i}): entry {i + j} is {self._entries[i + j]}, expected sibling "
                        f"{want} (all K siblings must be present at the same level)"
                    )
                if self._dropped[i + j]:
                    raise IllegalEdit(f"collapse({i}): sibling {want} at entry {i + j} is dropped")
        if not self._exists(parent):
            raise IllegalEdit(f"collapse({i}): parent {parent} is not in the tree")
        return group, parent

    def collapse_size(self, i: int) -> int:
        """Entries ``collapse(i)`` would replace, or 0 if illegal: the allocator's fast, exception-free check
        (same rules as :meth:`collapse_error`: contiguity makes K same-level aligned entries exact siblings)."""
        ents, k = self._entries, self.block_size
        if not 0 <= i < len(ents) or self._dropped[i]:
            return 0
        e = ents[i]
        if e.level + 1 > self.depth:
            return 0
        if e.level == 0:
            group = 1
        else:
            if e.index % k or i + k > len(ents):
                return 0
            for j in range(i + 1, i + k):
                if ents[j].level != e.level or self._dropped[j]:
                    return 0
            group = k
        return group if self._exists(e.parent(k)) else 0

    def collapse_group(self, i: int) -> range:
        """Entry indices that ``collapse(i)`` would replace (raises if illegal)."""
        group, _ = self._collapse_plan(i)
        return range(i, i + group)

    # ------------------------------------------------------------------ mutations
    def expand(self, i: int) -> list[Entry]:
        """Replace gist ``i`` by its children (an LOD1 gist by its raw block). Returns the new entries."""
        children = self._expand_plan(i)
        self._entries[i : i + 1] = children
        self._dropped[i : i + 1] = [False] * len(children)
        self._cost += sum(c.cost(self.block_size) for c in children) - 1
        self._after_mutation(i, i + len(children))
        return children

    def collapse(self, i: int) -> Entry:
        """Replace K aligned siblings starting at ``i`` (or raw block ``i``) by their parent gist."""
        group, parent = self._collapse_plan(i)
        old = sum(self._entries[j].cost(self.block_size) for j in range(i, i + group))
        self._entries[i : i + group] = [parent]
        self._dropped[i : i + group] = [False]
        self._cost += 1 - old
        self._after_mutation(i, i + 1)
        return parent

    def drop(self, i: int) -> None:
        """Mark entry ``i`` dropped (truncation baselines only)."""
        if not self.allows_drop:
            raise IllegalEdit(
                f"drop({i}): this WC does not allow drops (only truncation baselines drop history)"
            )
        e = self._check_index(i, "drop")
        self._dropped[i] = True
        self._cost -= e.cost(self.block_size)
        self._after_mutation(i, i + 1)

    def restore(self, i: int) -> None:
        """Un-drop entry ``i`` if it fits the budget."""
        if not 0 <= i < len(self._entries) or not self._dropped[i]:
            raise IllegalEdit(f"restore({i}): not a dropped entry")
        c = self._entries[i].cost(self.block_size)
        if self._cost + c > self.budget:
            raise BudgetExceeded(f"restore({i}): cost would be {self._cost + c} > budget {self.budget}")
        self._dropped[i] = False
        self._cost += c
        self._after_mutation(i, i + 1)

    def advance(self, new_num_tokens: int, fit: FitFn | None = None) -> list[Entry]:
        """Append tokens up to ``new_num_tokens``: the tail grows and each completed block becomes a raw entry.

        If that goes over budget, ``fit`` (default: :func:`collapse_oldest`; the allocator passes its
        score-aware ``fit_to_budget``) collapses entries on a staged copy until it fits; the WC is only updated
        if the result is legal, else :class:`BudgetExceeded` is raised and nothing changes. So the budget
        invariant holds after every public call, and no history is trimmed. Returns the new raw entries.
        """
        if new_num_tokens < self._num_tokens:
            raise IllegalEdit(f"advance({new_num_tokens}): the tree is append-only (T={self._num_tokens})")
        if self.tree is not None and new_num_tokens > int(self.tree.num_tokens):
            raise IllegalEdit(f"advance({new_num_tokens}): the tree only has {self.tree.num_tokens} tokens")
        staged = self.copy(budget=max(self.budget, self._cost))
        staged.budget = self.budget
        staged._staging = True
        old_full = self.n_full
        staged._num_tokens = int(new_num_tokens)
        new = [Entry(0, b) for b in range(old_full, staged.n_full)]
        staged._entries.extend(new)
        staged._dropped.extend([False] * len(new))
        staged._cost = staged._recompute_cost()
        if staged._cost > staged.budget:
            (fit or collapse_oldest)(staged)
        staged._staging = False
        if staged._cost > staged.budget:
            raise BudgetExceeded(
                f"advance({new_num_tokens}): cost {staged._cost} still exceeds budget {self.budget} after "
                f"fitting (minimum possible {min_cost(self.block_size, self.depth, new_num_tokens, self.tree)})"
            )
        staged.validate()
        self._num_tokens, self._entries, self._dropped, self._cost = (
            staged._num_tokens,
            staged._entries,
            staged._dropped,
            staged._cost,
        )
        return new

    # ------------------------------------------------------------------ assembly
    def _slot_arrays(self, j: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entry index, level, node index) per slot, for entries ``j:`` and the tail."""
        k = self.block_size
        ents = self._entries[j:]
        n = len(ents)
        lv = np.fromiter((e.level for e in ents), dtype=np.int64, count=n)
        ix = np.fromiter((e.index for e in ents), dtype=np.int64, count=n)
        live = ~np.asarray(self._dropped[j:], dtype=bool).reshape(-1)
        counts = np.where(lv == 0, k, 1) * live
        ent = np.repeat(np.arange(n, dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        offs = np.arange(ent.size, dtype=np.int64) - np.repeat(first, counts)
        lv_rep, ix_rep = lv[ent], ix[ent]
        node = np.where(lv_rep == 0, ix_rep * k + offs, ix_rep)
        tail = np.arange(self.tail_start, self._num_tokens, dtype=np.int64)
        return (
            np.concatenate([ent + j, np.full(tail.size, -1, dtype=np.int64)]),
            np.concatenate([lv_rep, np.zeros(tail.size, dtype=np.int64)]),
            np.concatenate([node, tail]),
        )

    def slot_map(self) -> SlotMap:
        """Per slot: entry index (-1 = tail), level, tree node index (raw tokens -> token nodes (0, t))."""
        ent, lv, node = self._slot_arrays()
        return SlotMap(torch.from_numpy(ent), torch.from_numpy(lv), torch.from_numpy(node))

    def position_ids(self, position_mode: str = "centre", slots: SlotMap | None = None) -> torch.Tensor:
        """Position id per slot: raw tokens their true position, gists per :mod:`mchar.core.positions`."""
        check_mode(position_mode)
        slots = slots if slots is not None else self.slot_map()
        lv = slots.levels.numpy()
        node = slots.node_index.numpy()
        width = np.power(self.block_size, lv)
        gpos = gist_positions(node * width, width, position_mode)
        return torch.from_numpy(np.where(lv == 0, node, gpos))

    def assemble(
        self,
        tree: Any,
        embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        position_mode: str = "centre",
    ) -> tuple[torch.Tensor, torch.Tensor, SlotMap]:
        """Materialise the WC: ``(inputs_embeds [1,W,d], position_ids [1,W], slot map)``.

        Live entries come from ``tree.entry_embeddings`` (raw block -> its K token embeddings, gist -> 1 vector),
        the tail from ``embed_fn(tree.tokens(tail_start, T))`` (``embed_fn`` defaults to ``tree.embed_fn``).
        """
        check_mode(position_mode)
        if int(tree.num_tokens) < self._num_tokens:
            raise IllegalEdit(
                f"assemble: the tree has {tree.num_tokens} tokens, the WC covers {self._num_tokens}"
            )
        slots = self.slot_map()
        live = [e for e, d in zip(self._entries, self._dropped, strict=True) if not d]
        parts: list[torch.Tensor] = []
        if live:
            emb = tree.entry_embeddings(live)
            parts.append(emb.reshape(-1, emb.shape[-1]))
        if self.tail_len:
            fn = embed_fn if embed_fn is not None else tree.embed_fn
            ids = tree.tokens(self.tail_start, self._num_tokens)
            tail = fn(ids.reshape(-1))
            parts.append(tail.reshape(-1, tail.shape[-1]))
        if not parts:
            raise IllegalEdit("assemble: the working context is empty (no tokens)")
        dtype = parts[0].dtype
        embeds = torch.cat([p.to(dtype=dtype, device=parts[0].device) for p in parts], dim=0)
        if embeds.shape[0] != len(slots):
            raise IllegalEdit(f"assemble: the tree returned {embeds.shape[0]} rows for {len(slots)} slots")
        pos = self.position_ids(position_mode, slots).to(embeds.device)
        return embeds.unsqueeze(0), pos.unsqueeze(0), slots

    def first_difference(self, other: WorkingContext) -> int:
        """Length of the common prefix of the two slot sequences (index of the first differing slot).

        Equal to ``min(W_self, W_other)`` when one is a prefix of the other, e.g. after :meth:`advance` with no
        edit; the session reuses the KV cache up to this slot.
        """
        if self.block_size != other.block_size:
            return 0
        s = 0
        j = 0
        n = min(len(self._entries), len(other._entries))
        while j < n and self._entries[j] == other._entries[j] and self._dropped[j] == other._dropped[j]:
            s += self.entry_cost(j)
            j += 1
        a = self._slots_from(j)
        b = other._slots_from(j)
        m = min(a.shape[1], b.shape[1])
        diff = np.nonzero((a[:, :m] != b[:, :m]).any(axis=0))[0]
        return s + (int(diff[0]) if diff.size else m)

    def _slots_from(self, j: int) -> np.ndarray:
        """Slot nodes ([2, n]: level, node index) from entry ``j`` to the end."""
        _, lv, node = self._slot_arrays(j)
        return np.stack([lv, node])


def collapse_oldest(wc: WorkingContext) -> None:
    """Default fit: collapse the oldest legal group until the WC is within budget (history goes coarse first)."""
    while wc.cost > wc.budget:
        for i in range(len(wc)):
            if wc.collapse_error(i) is None:
                wc.collapse(i)
                break
        else:
            return
