"""Shared, vectorised batch construction for GistNet / LensNet / end-to-end training.

A training *window* is ``T = P + H`` token ids: a prefix of ``P`` tokens (a multiple of K) that may be compressed,
then a horizon of ``H`` true next tokens that the loss is computed on. Why it is built this way:

* **One gather per batch.** Token embeddings ``[B, T, d]`` and every gist level ``[B, n_l, d]`` are concatenated
  into one *source bank* ``[B, N, d]``. A student layout is just an index vector into the bank plus position ids,
  so a whole batch of (possibly different) layouts is materialised with one advanced-indexing gather; no Python
  loop over tokens, no per-sample ``torch.cat``.
* **Left padding + an explicit attention mask, always** (also for unpadded rows: see :func:`horizon_logits`) for rows of different lengths: the horizon is then always the last ``H``
  slots of every row, so the base computes logits only for those (``logits_to_keep=H+1``) instead of the whole
  sequence (``[rows, L, vocab]`` logits would dominate memory for real vocabularies).
* **Targets are shifted once, here.** Slot ``j`` predicts slot ``j+1``; the horizon token ``x[P+h]`` is predicted by
  the slot just before it, which is the last prefix slot for ``h = 0``. An all-raw layout is therefore the plain
  LM on ``x[:P+H]`` and reproduces its loss exactly (tested against HF's own ``labels`` loss).
* **Batches are a pure function of (seed, step, rank)** (:class:`StepBatches`), so a run killed with ``kill -9``
  and resumed from its last checkpoint sees exactly the batches the uninterrupted run saw.
* Layout slot ids / positions follow :class:`~mchar.core.working_context.WorkingContext` exactly (tested), so what
  is trained is what the runtime session feeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mchar.core.allocator import initial_context
from mchar.core.entries import Entry
from mchar.core.positions import gist_positions
from mchar.core.working_context import WorkingContext

GistFn = Callable[[torch.Tensor, int], torch.Tensor]


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- data


class StepBatches(IterableDataset):
    """Yields the training batch of every step ``start..stop-1``; batch = f(seed, rank, step) only."""

    def __init__(
        self, windows: torch.Tensor, batch_size: int, seed: int, start: int, stop: int, rank: int = 0
    ) -> None:
        super().__init__()
        if windows.dim() != 2 or windows.shape[0] == 0:
            raise ValueError(f"need a non-empty [N, T] tensor of windows, got {list(windows.shape)}")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.start, self.stop, self.rank = start, stop, rank

    def batch(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.rank, step, 17))
        idx = torch.randint(0, self.windows.shape[0], (self.batch_size,), generator=gen)
        return self.windows[idx]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step in range(self.start, self.stop):
            yield self.batch(step)


def chunk_windows(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Fixed, ordered evaluation batches (validation must not depend on the training RNG)."""
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


class RankBatches(IterableDataset):
    """This rank's share of the fixed evaluation batches: global batches ``rank, rank + world, ...``.

    Under DDP every held-out window is scored exactly once over all ranks (Lightning's DistributedSampler pads the
    last round with repeats, which the synced means would count twice), and a batch's global index is
    ``local index * world + rank`` (:func:`global_batch_index`), so validation seeds, and with them the numbers,
    are those of a single process. Every rank gets the same number of batches, the missing ones as empty
    ``[0, T]`` batches that score nothing: a rank with no batch at all would skip the validation, and with it the
    metric sync the other ranks wait in.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        chunks = chunk_windows(windows, batch_size)
        mine = chunks[rank::world]
        self.batches = mine + [windows[:0]] * (-(-len(chunks) // world) - len(mine))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


def global_batch_index(local: int, rank: int, world: int) -> int:
    """The global position of the ``local``-th batch a rank got from :class:`RankBatches`."""
    return local * world + rank


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class WindowShape:
    """The static tree of one prefix: what ``initial_context``/``WorkingContext`` need (duck-types the tree)."""

    block_size: int
    depth: int
    num_tokens: int

    def num_nodes(self, level: int) -> int:
        return self.num_tokens // self.block_size ** max(level, 0) if level > 0 else self.num_tokens


def prefix_len(window: int, horizon: int, block_size: int) -> int:
    """Largest multiple of K that leaves ``horizon`` tokens after it."""
    p = (window - horizon) // block_size * block_size
    if p < block_size:
        raise ValueError(f"window {window} too short for horizon {horizon} and block size {block_size}")
    return p


def bank_offsets(num_tokens: int, prefix: int, block_size: int, depth: int) -> list[int]:
    """Start of each level in the source bank: tokens [0, T), then LOD1 ... LODdepth gists of the prefix."""
    offs = [0]
    cur = num_tokens
    for level in range(1, depth + 1):
        offs.append(cur)
        cur += prefix // block_size**level
    offs.append(cur)
    return offs


# ---------------------------------------------------------------------------------------------- gists


def build_gists(
    gist_fn: GistFn, tok_emb: torch.Tensor, block_size: int, depth: int, first_level: int = 1
) -> list[torch.Tensor]:
    """Every gist of the prefix ``tok_emb [B, P, d]``: level l = gist_fn over K level-(l-1) vectors.

    Level 2 is computed from the level-1 gists just made (with grad), as the tree does. With ``first_level`` L > 1,
    ``tok_emb`` holds the level-(L-1) vectors and levels L..``depth`` are returned.
    """
    b, p, d = tok_emb.shape
    k = block_size
    out: list[torch.Tensor] = []
    children = tok_emb
    for level in range(first_level, depth + 1):
        n = children.shape[1] // k
        if n == 0:
            out.append(tok_emb.new_zeros(b, 0, d))
            children = out[-1]
            continue
        g = gist_fn(children[:, : n * k].reshape(b * n, k, d), level).reshape(b, n, d)
        out.append(g)
        children = g
    return out


def source_bank(tok_emb: torch.Tensor, gists: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, T + sum n_l, d]``: what layout indices point into."""
    return torch.cat([tok_emb, *[g.to(tok_emb.dtype) for g in gists]], dim=1)


# ---------------------------------------------------------------------------------------------- layouts


def prefix_slots(
    entries: Sequence[Entry],
    block_size: int,
    offsets: Sequence[int],
    position_mode: str = "centre",
    dropped: Sequence[bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(bank index, position id) per slot of the prefix entries (same slots as ``WorkingContext.slot_map``)."""
    k = block_size
    n = len(entries)
    lv = np.fromiter((e.level for e in entries), dtype=np.int64, count=n)
    ix = np.fromiter((e.index for e in entries), dtype=np.int64, count=n)
    live = np.ones(n, dtype=bool) if dropped is None else ~np.asarray(dropped, dtype=bool)
    counts = np.where(lv == 0, k, 1) * live
    ent = np.repeat(np.arange(n), counts)
    offs = np.arange(ent.size) - np.repeat(np.cumsum(counts) - counts, counts)
    lv_r, ix_r = lv[ent], ix[ent]
    tok = ix_r * k + offs
    width = np.power(k, lv_r)
    gpos = gist_positions(ix_r * width, width, position_mode) if ent.size else np.zeros(0, np.int64)
    off_arr = np.asarray(offsets, dtype=np.int64)
    bank = np.where(lv_r == 0, tok, off_arr[np.minimum(lv_r, len(off_arr) - 1)] + ix_r)
    pos = np.where(lv_r == 0, tok, gpos)
    return bank, pos


def check_tiling(entries: Sequence[Entry], block_size: int, prefix: int) -> None:
    """Entries must tile [0, prefix) in order (cheap guard; the WC class does the full validation)."""
    cur = 0
    for e in entries:
        s, t = e.span(block_size)
        if s != cur:
            raise ValueError(f"layout gap/overlap at token {cur}: entry {e} starts at {s}")
        cur = t
    if cur != prefix:
        raise ValueError(f"layout covers [0, {cur}), expected [0, {prefix})")


def raw_layout(prefix: int, block_size: int) -> list[Entry]:
    return [Entry(0, b) for b in range(prefix // block_size)]


def level_layout(prefix: int, block_size: int, level: int, keep_raw_blocks: int = 1) -> list[Entry]:
    """Every level-``level`` node that fits before the last ``keep_raw_blocks`` raw blocks; raw elsewhere."""
    k = block_size
    n_blocks = prefix // k
    limit = n_blocks - keep_raw_blocks
    w = k ** (level - 1)
    out: list[Entry] = []
    b = 0
    while b < n_blocks:
        if level > 0 and b % w == 0 and b + w <= limit:
            out.append(Entry(level, b // w))
            b += w
        else:
            out.append(Entry(0, b))
            b += 1
    return out


def single_span_layout(prefix: int, block_size: int, level: int, index: int) -> list[Entry]:
    """All raw except one aligned level-``level`` node."""
    k = block_size
    w = k ** (level - 1)
    out: list[Entry] = []
    b = 0
    while b < prefix // k:
        if b == index * w:
            out.append(Entry(level, index))
            b += w
        else:
            out.append(Entry(0, b))
            b += 1
    return out


def random_layout(
    prefix: int,
    block_size: int,
    depth: int,
    gen: np.random.Generator,
    keep_raw_blocks: int = 1,
    raw_prob: float = 0.25,
) -> list[Entry]:
    """A random aligned mix of LOD0..LODdepth (the newest ``keep_raw_blocks`` blocks stay raw).

    At each aligned position the level is drawn among those that fit: raw with ``raw_prob``, otherwise uniformly
    among the gist levels that fit, so every level appears in most layouts.
    """
    k = block_size
    n_blocks = prefix // k
    limit = n_blocks - keep_raw_blocks
    out: list[Entry] = []
    b = 0
    while b < n_blocks:
        fits = [lv for lv in range(1, depth + 1) if b % k ** (lv - 1) == 0 and b + k ** (lv - 1) <= limit]
        if not fits or gen.random() < raw_prob:
            out.append(Entry(0, b))
            b += 1
            continue
        lv = int(gen.choice(fits))
        w = k ** (lv - 1)
        out.append(Entry(lv, b // w))
        b += w
    return out


def random_wc(
    shape: WindowShape, budget: int, gen: np.random.Generator, edits: int, start: WorkingContext | None = None
) -> WorkingContext:
    """``initial_context`` at the budget plus ``edits`` random legal edits: the WCs a session holds, varied.
    ``start``: that initial context, already made (it is edited in place)."""
    wc = initial_context(shape, budget) if start is None else start
    for _ in range(edits):
        ops = [(i, "c") for i in range(len(wc)) if wc.collapse_size(i)]
        if wc.cost + shape.block_size - 1 <= budget:
            ops += [(i, "e") for i in range(len(wc)) if wc[i].level > 0]
        if not ops:
            break
        i, op = ops[int(gen.integers(0, len(ops)))]
        wc.expand(i) if op == "e" else wc.collapse(i)
    return wc


def random_fill_wc(
    shape: WindowShape, budget: int, gen: np.random.Generator, start: WorkingContext | None = None
) -> WorkingContext:
    """The coarsest cover, then uniformly random gists expanded until the budget is spent: LOD1 gists and raw
    blocks land anywhere in the history (a recency-first WC keeps far-back needles under LOD2 gists, where
    their one-step utility is ~0, so LensNet would never see them as candidates). ``start``: that cover, already
    made (it is edited in place)."""
    wc = initial_context(shape, budget, expand_recent=False) if start is None else start
    while wc.cost + shape.block_size - 1 <= budget:
        gists = [i for i in range(len(wc)) if wc[i].level > 0]
        if not gists:
            break
        wc.expand(gists[int(gen.integers(0, len(gists)))])
    return wc


def session_layout(
    prefix: int, block_size: int, depth: int, budget: int, gen: np.random.Generator, max_edits: int = 3
) -> list[Entry]:
    """A layout like the WCs a session holds at ``budget``: the recency-first cover (the newest blocks raw, then
    LOD1, LOD2, ... going back) plus 0..``max_edits`` random legal edits. In a session a gist stands for history
    *behind* a raw present, unlike :func:`random_layout`'s mostly-gist prefixes, where the gists next to the
    horizon carry what raw tokens carry in a session."""
    shape = WindowShape(block_size, depth, prefix)
    return list(random_wc(shape, budget, gen, int(gen.integers(0, max_edits + 1))).entries)


def training_layout(
    prefix: int,
    block_size: int,
    depth: int,
    gen: np.random.Generator,
    keep_raw_blocks: int = 1,
    raw_prob: float = 0.25,
    session_share: float = 0.0,
    budget: int | None = None,
    session_edits: int = 3,
) -> list[Entry]:
    """With probability ``session_share`` (and a ``budget``) a :func:`session_layout`, otherwise a
    :func:`random_layout`; at ``session_share`` 0 the random stream is exactly :func:`random_layout`'s."""
    if session_share > 0 and budget is not None and gen.random() < session_share:
        return session_layout(prefix, block_size, depth, budget, gen, session_edits)
    return random_layout(prefix, block_size, depth, gen, keep_raw_blocks, raw_prob)


# ---------------------------------------------------------------------------------------------- assembly


@dataclass
class Rows:
    """A batch of student rows, left-padded: ``bank_idx``/``positions``/``mask`` are ``[R, L]``, ``batch`` ``[R]``."""

    batch: torch.Tensor
    bank_idx: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())


def build_rows(
    layouts: Sequence[tuple[int, np.ndarray, np.ndarray]],
    prefix: int,
    horizon: int,
    device: torch.device | str = "cpu",
) -> Rows:
    """Rows from ``(window index, prefix bank idx, prefix positions)``; the raw horizon is appended to each."""
    h_idx = np.arange(prefix, prefix + horizon, dtype=np.int64)
    lens = np.fromiter((len(b) + horizon for _, b, _ in layouts), dtype=np.int64, count=len(layouts))
    width = int(lens.max())
    r = len(layouts)
    idx = np.zeros((r, width), dtype=np.int64)
    pos = np.zeros((r, width), dtype=np.int64)
    mask = np.zeros((r, width), dtype=bool)
    for i, (_, b, p) in enumerate(layouts):  # one row per layout (not per token / per pair)
        s = width - lens[i]
        idx[i, s:] = np.concatenate([b, h_idx])
        pos[i, s:] = np.concatenate([p, h_idx])
        mask[i, s:] = True
    batch = torch.tensor([w for w, _, _ in layouts], dtype=torch.long)
    return Rows(
        batch.to(device),
        torch.from_numpy(idx).to(device),
        torch.from_numpy(pos).to(device),
        torch.from_numpy(mask).to(device),
    )


def gather_rows(bank: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``[R, L, d]`` inputs_embeds: one advanced-indexing gather (differentiable w.r.t. the bank)."""
    return bank[rows.batch[:, None], rows.bank_idx]


def horizon_logits(base: nn.Module, embeds: torch.Tensor, rows: Rows, horizon: int) -> torch.Tensor:
    """Logits ``[R, H, V]`` of the slots that predict the H horizon tokens (the last H+1 slots minus the last)."""
    model = base.model if hasattr(base, "model") else base
    if hasattr(base, "check_positions"):
        base.check_positions(rows.positions)
    # Always pass the 2-D mask: without one, transformers>=4.5x treats every jump in position_ids (i.e. every
    # gist) as the start of a new packed sequence and blocks attention across it, silently cutting the horizon
    # off from everything before the last gist.
    logits = model(
        inputs_embeds=embeds,
        position_ids=rows.positions,
        attention_mask=rows.mask.long(),
        logits_to_keep=horizon + 1,
        use_cache=False,
    ).logits
    return logits[:, -horizon - 1 : -1]


def teacher_logits(base: nn.Module, ids: torch.Tensor, prefix: int, horizon: int) -> torch.Tensor:
    """Teacher = frozen base on the full raw window ``ids[:, :P+H]`` (true positions); ``[B, H, V]``."""
    model = base.model if hasattr(base, "model") else base
    x = ids[:, : prefix + horizon]
    return model(input_ids=x, logits_to_keep=horizon + 1, use_cache=False).logits[:, -horizon - 1 : -1]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[R, H]`` (float32 for stability)."""
    r, h, v = logits.shape
    return F.cross_entropy(logits.float().reshape(r * h, v), targets.reshape(r * h), reduction="none").view(
        r, h
    )


def token_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) ``[R, H]``."""
    t = F.log_softmax(teacher.float(), -1)
    s = F.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def variant_cross_entropy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``H(teacher, student)`` ``[R, H]`` of student rows stacked window-inner
    (``R = n * B``, row ``r`` scored against window ``r % B``).

    It is ``KL(teacher || student)`` plus the teacher's entropy, the same for every row of a window, so gains between
    rows of one window are the KL gains exactly. Computed as ``logsumexp(s) - <p_t, s>`` against the ``B`` teacher
    distributions once, instead of a log-softmax of every ``[R, H, V]`` row and of the teacher repeated per row:
    the ``expected`` LensNet utilities cost ~4x less this way (the plain KL was a third of a LensNet step)."""
    b, h, v = teacher.shape
    p = torch.softmax(teacher.float(), -1)
    s = student.float().view(-1, b, h, v)
    return (torch.logsumexp(s, -1) - torch.einsum("nbhv,bhv->nbh", s, p)).reshape(-1, h)


# ---------------------------------------------------------------------------------------------- lensnet inputs


def entry_features(
    entries_per_row: Sequence[Sequence[Entry]],
    rows_batch: Sequence[int],
    tok_emb: torch.Tensor,
    gists: Sequence[torch.Tensor],
    block_size: int,
    prefix: int,
    raw: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LensNet inputs for WCs (one per row, padded right): embeds, levels, widths, distances, mask.

    Entry embedding convention of :func:`mchar.core.lensnet.entry_embedding`: raw block = mean of its K token
    embeddings (``raw="mean"``) or its LOD1 gist (``raw="gist"``), gist = its vector. Built with one gather from a
    bank of block vectors + gists.
    """
    k = block_size
    b, _, d = tok_emb.shape
    if raw == "gist":
        blocks = gists[0].to(tok_emb.dtype)
    else:
        blocks = tok_emb[:, :prefix].reshape(b, prefix // k, k, d).mean(2)
    bank = torch.cat([blocks, *[g.to(tok_emb.dtype) for g in gists]], dim=1)
    offs = [0, prefix // k]
    for g in gists[:-1]:
        offs.append(offs[-1] + g.shape[1])
    width = max(len(e) for e in entries_per_row)
    r = len(entries_per_row)
    idx = np.zeros((r, width), dtype=np.int64)
    lv = np.zeros((r, width), dtype=np.int64)
    wd = np.ones((r, width), dtype=np.int64)
    dist = np.zeros((r, width), dtype=np.int64)
    mask = np.zeros((r, width), dtype=bool)
    for i, ents in enumerate(entries_per_row):
        n = len(ents)
        lvl = np.fromiter((e.level for e in ents), dtype=np.int64, count=n)
        ix = np.fromiter((e.index for e in ents), dtype=np.int64, count=n)
        w = np.power(k, np.maximum(lvl, 1))
        idx[i, :n] = np.asarray(offs)[lvl] + ix
        lv[i, :n], wd[i, :n], dist[i, :n], mask[i, :n] = lvl, w, prefix - (ix + 1) * w, True
    dev = tok_emb.device
    bi = torch.tensor(list(rows_batch), dtype=torch.long, device=dev)
    emb = bank[bi[:, None], torch.from_numpy(idx).to(dev)]
    return (
        emb,
        torch.from_numpy(lv).to(dev),
        torch.from_numpy(wd).to(dev),
        torch.from_numpy(dist).to(dev),
        torch.from_numpy(mask).to(dev),
    )


class StepDataModule(L.LightningDataModule):
    """Train batches = f(seed, rank, step) starting at the restored ``global_step``; fixed ordered val batches,
    split between DDP ranks without repeats (:class:`RankBatches`).

    Lightning builds the train dataloader after restoring a checkpoint, so a resumed run continues with the batch
    of its next step instead of replaying the epoch from the start (what a shuffled DataLoader would do).
    ``extra_val`` adds further named validation sets (e.g. held-out retrieval windows): Lightning then runs one
    val dataloader per set at every validation, in order (``dataloader_idx`` 0 = ``val``).
    """

    def __init__(
        self,
        train: torch.Tensor,
        val: torch.Tensor | None,
        batch_size: int,
        max_steps: int,
        seed: int = 0,
        val_batch_size: int | None = None,
        extra_val: list[torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.max_steps, self.seed = batch_size, max_steps, seed
        self.val_batch_size = val_batch_size or batch_size
        self.extra_val = list(extra_val or [])

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        start = int(trainer.global_step) if trainer is not None else 0
        rank = int(trainer.global_rank) if trainer is not None else 0
        ds = StepBatches(self.train, self.batch_size, self.seed, start, self.max_steps + 1, rank)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def _loader(self, windows: torch.Tensor | None) -> DataLoader:
        if windows is None or windows.shape[0] == 0:
            return DataLoader([], batch_size=None)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(RankBatches(windows, self.val_batch_size, rank, world), batch_size=None)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.extra_val:
            return self._loader(self.val)
        return [self._loader(v) for v in (self.val, *self.extra_val)]
