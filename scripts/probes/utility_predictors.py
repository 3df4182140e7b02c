"""Offline probe: which simple entry features predict LensNet's targets on held-out windows, measured both ways
(sampled horizon-NLL gains, and the same gains in expectation under the full-context model)?

For the held-out code and retrieval windows LensNet validates on (up to N_WINDOWS of each, default 16; the
quickstart holds out 11 and 12), it samples WCS_PER_BATCH of the validation's WCs of each kind per batch of 4
windows (session-like "recent" and far-back "fill"; default 1, the validation's own draw) and their candidates,
measures the candidates' utilities both ways from one variant forward, and prints the mean per-window Spearman
against them of: LensNet, `recency`, `similarity`, and two level orders (raw blocks first then by recency, and the
reverse). On the quickstart nets `similarity` is the best
of them on code against the expected utilities (0.24 / 0.26 on fill / recent WCs; LensNet 0.15 / 0.14, `recency`
0.13 / 0.07). With 8 WCs per batch (`... NAME 16 8`, 50 s) LensNet trained on expected utilities for 1,200 steps
ranks the held-out retrieval windows' expected utilities at 0.425 / 0.600 (fill / recent; seed 0) and 0.432 / 0.615
(seed 1), the quickstart's (sampled) LensNet at 0.111 / 0.323.

    # after `python -m mchar fit +experiment=quickstart`:
    python scripts/probes/utility_predictors.py [LENSNET_NAME [N_WINDOWS [WCS_PER_BATCH]]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mchar.core.working_context import WorkingContext
from mchar.lit import windows as W
from mchar.lit.lensnet_module import per_window_spearman, stake_agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _utility_rows import held_out_lens_module  # noqa: E402


def main(lensnet_name: str = "quickstart", n_windows: int = 16, wcs_per_batch: int = 1) -> None:
    cfg, module, val, retrieval = held_out_lens_module("quickstart", lensnet_name, n_windows)
    k = cfg.tree.block_size
    found: dict[tuple[str, str, str, str], list[torch.Tensor]] = {}
    stakes: dict[tuple[str, str, str, str], list[torch.Tensor]] = {}
    with torch.no_grad():
        for set_name, data in (("code", val), ("retrieval", retrieval)):
            for bi, ids in enumerate(W.chunk_windows(data, 4)):
                n = ids.shape[0]
                prefix, targets, tok, gists, bank = module.window_state(ids)
                teacher = module.teacher(ids, prefix)
                gen = np.random.default_rng(W.step_seed(cfg.seed, bi, 19))
                for kind, rep in ((kind, rep) for kind in ("recent", "fill") for rep in range(wcs_per_batch)):
                    entries, cand = module.validation_wc(bi, prefix, kind, rep)
                    plan = module.plan_for(entries, cand, prefix, bank)
                    logits = module.variant_logits(bank, plan)
                    utilities = {
                        "sampled": module.utilities_from(logits, plan, targets),
                        "expected": module.utilities_from(logits, plan, targets, teacher),
                    }
                    wc = WorkingContext(k, module.depth, 1 << 30, prefix, entries=entries)
                    picked = torch.as_tensor(cand)
                    scores, _ = module.lens_scores([entries] * n, range(n), tok, gists, prefix, ids)
                    features = {"lensnet": scores[:, picked]}
                    for policy in ("recency", "similarity"):
                        ranked = module.policy_scores(policy, [wc] * n, tok, gists, prefix, gen, ids=ids)
                        features[policy] = torch.stack(ranked)[:, picked]
                    level = torch.tensor([float(entries[int(i)].level) for i in cand])
                    end = torch.tensor([float(entries[int(i)].end(k)) for i in cand])
                    features["raw_first"] = (-level * 1e6 + end).expand(n, -1)
                    features["gists_first"] = (level * 1e6 + end).expand(n, -1)
                    for measure, u in utilities.items():
                        for name, f in features.items():
                            key = (set_name, measure, kind, name)
                            found.setdefault(key, []).append(per_window_spearman(f.float(), u.cpu()))
                            stakes.setdefault(key, []).append(stake_agreement(f.float(), u.cpu()))
    print("windows      utilities  WCs     feature      Spearman  stake agreement")
    for key, rhos in sorted(found.items()):
        set_name, measure, kind, name = key
        rho, stake = float(torch.cat(rhos).nanmean()), float(torch.cat(stakes[key]).nanmean())
        print(f"{set_name:12s} {measure:10s} {kind:7s} {name:12s} {rho:8.3f}  {stake:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(n) for n in sys.argv[2:4]))
