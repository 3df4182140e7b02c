"""Perplexity at budget: NLL of a document's final tokens after a history much longer than the budget.

Protocol (DESIGN §4.1): every policy sees the same held-out documents at the same budget. The history
(``history_multiple x budget`` tokens) is *streamed* through a fresh :class:`MegaContextSession` in
``refocus_every``-token chunks, so the policy refocuses exactly as it would online; the final ``final_tokens``
are then scored chunk by chunk (one forward per chunk, KV cache reused up to the first edited slot, refocus
between chunks). Streaming the history costs no base forward for most policies (only the tree's GistNet and the
allocator run), which is what keeps this fast on a CPU. The oracle sees the true next chunk as its
``future_tokens`` (its upper bound is exactly that it knows the future).

The reference is the plain base on the whole document (``full``) where it fits its positions. ΔNLL = policy NLL -
full NLL per document, with a 95 % interval over documents (Student t, or a percentile bootstrap).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mchar.evals.gap import GAP_TERMS
from mchar.evals.telemetry import FOCUS_METRICS, FocusRecorder, merge_summaries


@dataclass
class PolicyResult:
    """Per-policy outcome over all documents."""

    nll: list[float] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    focus_map: np.ndarray | None = None
    focus_map_times: np.ndarray | None = None
    seconds: float = 0.0
    skipped: str | None = None


def _horizon(session: Any) -> int:
    h = getattr(session.policy, "horizon", None)
    return int(h or session.refocus_every)


def stream_ingest(
    session: Any, ids: torch.Tensor, future: torch.Tensor | None = None, recorder: FocusRecorder | None = None
) -> None:
    """Append ``ids`` in ``refocus_every`` chunks, giving the oracle the true next tokens at every refocus.

    ``future`` = tokens known to follow ``ids`` (empty / None when unknown: the oracle then has no opinion).
    """
    ids = ids.reshape(-1).long()
    after = torch.zeros(0, dtype=torch.long) if future is None else future.reshape(-1).long()
    known = torch.cat([ids, after])
    step, h = session.refocus_every, _horizon(session)
    for c in range(0, ids.numel(), step):
        chunk = ids[c : c + step]
        end = c + chunk.numel()
        session.future_tokens = known[end : end + h]
        before = session.stats.refocuses
        session.ingest(chunk)
        if recorder is not None and session.stats.refocuses != before:
            recorder.observe(session.wc)


def stream_score(session: Any, ids: torch.Tensor, recorder: FocusRecorder | None = None) -> torch.Tensor:
    """Per-token log-probs [n] of ``ids`` after the current history, committing them chunk by chunk."""
    ids = ids.reshape(-1).long()
    step, h = session.refocus_every, _horizon(session)
    out = []
    for c in range(0, ids.numel(), step):
        chunk = ids[c : c + step]
        end = c + chunk.numel()
        session.future_tokens = ids[end : end + h]
        before = session.stats.refocuses
        if recorder is not None:
            recorder.observe_scored(session.wc)
        out.append(session.score(chunk, commit=True)[1])
        if recorder is not None and session.stats.refocuses != before:
            recorder.observe(session.wc)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def full_context_logprobs(base: Any, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward of the base (the full-context reference)."""
    ids = ids.reshape(1, -1).long()
    pos = torch.arange(ids.shape[1], device=base.device).unsqueeze(0)
    logits, _ = base.forward_embeds(base.embed(ids), pos)
    lp = torch.log_softmax(logits[0, :-1].float(), -1)
    return lp.gather(-1, ids[0, 1:].to(lp.device).unsqueeze(-1))[:, 0].cpu()


def fits_full_context(base: Any, n_tokens: int) -> bool:
    """Whether the plain base can score ``n_tokens`` at once (within its maximum positions)."""
    limit = getattr(base, "max_positions", None)
    return limit is None or n_tokens <= int(limit)


def confidence_interval(
    values: Sequence[float], method: str = "t", level: float = 0.95, iters: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Two-sided interval for the mean of ``values`` (degenerate [m, m] with fewer than two values)."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    m = float(x.mean())
    if x.size < 2 or float(x.std()) == 0.0:
        return (m, m)
    alpha = 1.0 - level
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(iters, x.size))].mean(1)
        lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        return (min(float(lo), m), max(float(hi), m))
    from scipy import stats

    half = float(stats.t.ppf(1 - alpha / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return (m - half, m + half)


def make_documents(
    token_streams: Sequence[Sequence[int]],
    length: int,
    count: int,
    sep: int | None,
    within_files: bool = True,
) -> list[torch.Tensor]:
    """``count`` documents of exactly ``length`` tokens from held-out files.

    ``within_files`` (default): every document is a contiguous window of ONE file, taken round-robin (each file's
    first window, then each file's second, ...), so the history is the document's own past, not unrelated files
    glued in front of it (that measures how well a policy ignores distractors, and made dropping the history look
    better than reading it). ``False``: the files are concatenated with ``sep`` between and cut in order.
    """
    if within_files:
        files = list(token_streams)
        starts = [range(0, len(s) - length + 1, length) for s in files]
        picks = (
            (f, i) for rank in itertools.zip_longest(*starts) for f, i in enumerate(rank) if i is not None
        )
        return [
            torch.tensor(list(files[f][i : i + length]), dtype=torch.long)
            for f, i in itertools.islice(picks, count)
        ]
    docs: list[torch.Tensor] = []
    buf: list[int] = []
    for stream in token_streams:
        if buf and sep is not None:
            buf.append(int(sep))
        buf.extend(int(t) for t in stream)
        while len(buf) >= length and len(docs) < count:
            docs.append(torch.tensor(buf[:length], dtype=torch.long))
            buf = buf[length:]
        if len(docs) >= count:
            break
    return docs


def evaluate_policy(
    make_session: Callable[[], Any],
    documents: Sequence[torch.Tensor],
    final_tokens: int,
    budget: int,
    map_document: int | None = None,
) -> PolicyResult:
    """Stream each document's history through a fresh session, score the final tokens, record telemetry."""
    import time

    res = PolicyResult()
    t0 = time.perf_counter()
    for d, doc in enumerate(documents):
        session = make_session()
        history, final = doc[:-final_tokens], doc[-final_tokens:]
        rec = FocusRecorder(budget, map_tokens=doc.numel() if d == map_document else 0)
        stream_ingest(session, history, future=final, recorder=rec)
        lp = stream_score(session, final, recorder=rec)
        res.nll.append(float(-lp.mean()))
        res.telemetry.append(rec.summary())
        if d == map_document:
            res.focus_map, res.focus_map_times = rec.focus_map(), rec.map_times()
    res.seconds = time.perf_counter() - t0
    return res


def full_context_nll(base: Any, documents: Sequence[torch.Tensor], final_tokens: int) -> list[float] | None:
    """NLL of the final tokens with the whole document in context, or None when it does not fit the base."""
    if not documents or not fits_full_context(base, int(documents[0].numel())):
        return None
    return [float(-full_context_logprobs(base, doc)[-final_tokens:].mean()) for doc in documents]


def paired_difference(nll: Sequence[float], reference: Sequence[float], ci: str, seed: int) -> dict[str, Any]:
    """Mean per-document ``NLL - NLL(reference)`` over the documents both scored, its interval, and the documents
    where the reference is better (``wins``)."""
    n = min(len(nll), len(reference))
    diffs = [a - b for a, b in zip(nll[:n], reference[:n], strict=True)]
    return {
        "mean": float(np.mean(diffs)),
        "ci": list(confidence_interval(diffs, ci, seed=seed)),
        "wins": int(sum(d > 0 for d in diffs)),
        "documents": n,
    }


def summarise(
    results: dict[str, PolicyResult],
    full: list[float] | None,
    ci: str = "t",
    seed: int = 0,
    reference: str = "lensnet",
) -> dict[str, Any]:
    """The ``policies`` / ``full`` part of ``eval/results.json``.

    Besides ΔNLL vs full context, every policy gets its **paired** difference to ``reference`` (when that ran):
    ``NLL(policy) - NLL(reference)`` per document, with a CI. Documents differ far more from each other than
    policies do on one document, so unpaired CIs overlap even when one policy wins on every document. ``gap``
    holds the paired parts of ``lensnet − recency`` (:mod:`mchar.evals.gap`) when their policies ran.
    """
    out: dict[str, Any] = {
        "policies": {},
        "full": {"nll": float(np.mean(full)) if full else None, "per_document": full},
    }
    for name, r in results.items():
        if r.skipped:
            out["policies"][name] = {"skipped": r.skipped}
            continue
        tele = merge_summaries(r.telemetry)
        hist = tele.pop("lod_histogram")
        rec: dict[str, Any] = {
            "nll": float(np.mean(r.nll)),
            "per_document": r.nll,
            "telemetry": tele,
            "lod_histogram": hist,
            "seconds": r.seconds,
        }
        rec["documents"] = len(r.nll)
        if full:  # a policy run on fewer documents (eval.oracle_documents) is compared on its first ones
            deltas = [a - b for a, b in zip(r.nll, full[: len(r.nll)], strict=True)]
            rec["delta_nll"] = float(np.mean(deltas))
            if len(r.nll) < len(full):
                rec["full_nll"] = float(np.mean(full[: len(r.nll)]))  # the reference on the same documents
            rec["ci"] = list(confidence_interval(deltas, ci, seed=seed))
        else:
            rec["delta_nll"], rec["ci"] = None, [None, None]
        out["policies"][name] = rec
    ref = results.get(reference)
    if ref is not None and not ref.skipped:
        for name, rec in out["policies"].items():
            if name == reference or "skipped" in rec:
                continue
            rec["vs_reference"] = {
                "reference": reference,
                **paired_difference(results[name].nll, ref.nll, ci, seed),
            }
    ran = {name for name, r in results.items() if not r.skipped}
    gap = {
        term: {"policy": a, "reference": b, **paired_difference(results[a].nll, results[b].nll, ci, seed)}
        for term, (a, b) in GAP_TERMS.items()
        if {a, b} <= ran
    }
    if gap:
        out["gap"] = gap
    return out


def metrics_from_summary(summary: dict[str, Any], ppl: str = "ppl", focus: str = "focus") -> dict[str, float]:
    """Flatten to the MLflow metric contract (``<ppl>/<policy>/...``, ``<focus>/<policy>/...``; skip undefined).
    Another document set gets its own prefixes (``ppl_retrieval``)."""
    m: dict[str, float] = {}
    if summary["full"]["nll"] is not None:
        m[f"{ppl}/full/nll"] = summary["full"]["nll"]
    for name, rec in summary["policies"].items():
        if "skipped" in rec:
            continue
        m[f"{ppl}/{name}/nll"] = rec["nll"]
        m[f"{ppl}/{name}/documents"] = float(rec["documents"])
        if "full_nll" in rec:
            m[f"{ppl}/{name}/full_nll"] = rec["full_nll"]
        if rec["delta_nll"] is not None:
            m[f"{ppl}/{name}/delta_nll"] = rec["delta_nll"]
            lo, hi = rec["ci"]
            if lo is not None and math.isfinite(lo):
                m[f"{ppl}/{name}/delta_nll_ci_low"] = lo
                m[f"{ppl}/{name}/delta_nll_ci_high"] = hi
        vs = rec.get("vs_reference")
        if vs is not None:
            m |= _paired_metrics(f"{ppl}/{name}/vs_{vs['reference']}", vs)
        t = rec["telemetry"]
        for key in FOCUS_METRICS:
            m[f"{focus}/{name}/{key}"] = t[key]
        for lod, share in rec["lod_histogram"].items():  # share of seen history held at each LOD, or dropped
            m[f"{focus}/{name}/lod_share/{lod}"] = share
    for term, part in summary.get("gap", {}).items():
        m |= _paired_metrics(f"{ppl}/gap/{term}", part)
    return m


def _paired_metrics(key: str, part: dict[str, Any]) -> dict[str, float]:
    """``<key>/mean``, ``/ci_low``, ``/ci_high`` (when finite), ``/wins``, ``/documents`` of a paired difference."""
    m = {
        f"{key}/mean": part["mean"],
        f"{key}/wins": float(part["wins"]),
        f"{key}/documents": float(part["documents"]),
    }
    lo, hi = part["ci"]
    if lo is not None and math.isfinite(lo):
        m[f"{key}/ci_low"], m[f"{key}/ci_high"] = lo, hi
    return m
