"""Offline probe: would a lexical-overlap feature rank working-context entries by measured utility better than
LensNet or recency? (Answer on the quickstart nets: no.)

For the held-out code and retrieval windows LensNet validates on, it samples the same working contexts and
candidates as validation (session-like "recent" and far-back "fill" WCs), measures every candidate's utility with
the base, and prints the mean per-window Spearman against it of: LensNet, recency, similarity, the utilities' own
split-half agreement, and the share of the newest q tail tokens that also occur in an entry's span (q = 16, 64;
plain, or weighted by each token's inverse frequency in the prefix), alone and z-scored plus recency.

    python scripts/probe_lexical_overlap.py [NAME] [WINDOWS]   # after `python -m mchar fit +experiment=quickstart`
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mchar.core.entries import Entry
from mchar.core.working_context import WorkingContext
from mchar.lit import windows as W
from mchar.lit.lensnet_module import per_window_spearman

sys.path.insert(0, str(Path(__file__).resolve().parent / "probes"))
from _utility_rows import held_out_lens_module  # noqa: E402


def overlap(ids: torch.Tensor, entries: list[Entry], prefix: int, k: int, q: int, idf: bool) -> torch.Tensor:
    """Per entry: the tail tokens (newest ``q`` before ``prefix``) found in its span, as a share or IDF-weighted."""
    tail = set(ids[prefix - q : prefix].tolist())
    weight = 1.0 / torch.bincount(ids[:prefix]).float().clamp_min(1) if idf else None
    out = []
    for e in entries:
        start, end = e.span(k)
        shared = set(ids[start:end].tolist()) & tail
        out.append(
            sum(float(weight[t]) for t in shared) if weight is not None else len(shared) / max(1, len(tail))
        )
    return torch.tensor(out)


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)


def main(name: str = "quickstart", n_windows: int = 16) -> None:
    cfg, module, val, retrieval = held_out_lens_module(name, name, n_windows)
    k = cfg.tree.block_size
    res: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    with torch.no_grad():
        for set_name, data in (("code", val), ("retrieval", retrieval)):
            for bi, ids in enumerate(W.chunk_windows(data, 4)):
                n = ids.shape[0]
                prefix, targets, tok, gists, bank = module.window_state(ids)
                gen = np.random.default_rng(W.step_seed(cfg.seed, bi, 19))
                for kind in ("recent", "fill"):
                    entries, cand = module.validation_wc(bi, prefix, kind)
                    per_token = module.measure_utilities(bank, entries, cand, prefix, targets, per_token=True)
                    utils, ct = per_token.mean(-1), torch.as_tensor(cand)
                    wc = WorkingContext(k, cfg.tree.depth, 1 << 30, prefix, entries=entries)
                    scores = {
                        "lensnet": module.lens_scores([entries] * n, range(n), tok, gists, prefix, ids)[0]
                    }
                    for p in ("recency", "similarity"):
                        scores[p] = torch.stack(
                            module.policy_scores(p, [wc] * n, tok, gists, prefix, gen, ids=ids)
                        )
                    for q in (16, 64):
                        for idf in (False, True):
                            lex = torch.stack([overlap(ids[i], entries, prefix, k, q, idf) for i in range(n)])
                            label = f"overlap q{q}{' idf' if idf else ''}"
                            scores[label] = lex
                            scores[f"{label} + recency"] = zscore(lex) + zscore(scores["recency"])
                    for label, s in scores.items():
                        res.setdefault((set_name, kind, label), []).append(
                            per_window_spearman(s[:, ct], utils)
                        )
                    half = per_window_spearman(per_token[..., 0::2].mean(-1), per_token[..., 1::2].mean(-1))
                    res.setdefault((set_name, kind, "utility split-half"), []).append(half)
    for (set_name, kind, label), vals in sorted(res.items()):
        v = torch.cat(vals)
        print(f"{set_name:9s} {kind:6s} {label:26s} {torch.nanmean(v):6.3f}  ({v.numel()} windows)")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["quickstart"]), *(int(a) for a in sys.argv[2:3]))
