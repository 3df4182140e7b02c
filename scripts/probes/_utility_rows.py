"""Shared by the LensNet signal probes: measured utilities of sampled candidates on held-out windows, each paired
with LensNet's scores and the probe's own per-candidate features, for both kinds of training WC."""

from collections.abc import Callable

import numpy as np
import torch

Features = Callable[[torch.Tensor, torch.Tensor, int, list, np.ndarray], dict[str, np.ndarray]]


def utility_rows(mod, wins: torch.Tensor, features: Features, bs: int = 4) -> dict[str, list]:
    """``{kind: [(utilities [C], {feature: values [C], "lensnet": scores [C]}), ...]}`` for kind in recent / fill;
    ``features(window ids, window bank, prefix, entries, candidate indices)`` gives the probe's own signals."""
    out = {}
    for kind in ("recent", "fill"):
        rows = []
        for s in range(0, wins.shape[0], bs):
            ids = wins[s : s + bs]
            prefix, targets, tok, gists, bank = mod.window_state(ids)
            for rep in range(2):
                entries, cand = mod.sample_step(-1000 - s * 7 - rep, prefix, kind=kind)
                utils = mod.measure_utilities(bank, entries, cand, prefix, targets)
                scores, _ = mod.lens_scores([entries] * ids.shape[0], range(ids.shape[0]), tok, gists, prefix)
                cs = scores[:, torch.as_tensor(cand)]
                for w in range(ids.shape[0]):
                    f = features(ids[w], bank[w], prefix, entries, cand)
                    f["lensnet"] = cs[w].numpy()
                    rows.append((utils[w].numpy(), f))
        out[kind] = rows
    return out
