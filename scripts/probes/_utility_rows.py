"""Shared by the LensNet signal probes: measured utilities of sampled candidates on held-out windows, each paired
with LensNet's scores and the probe's own per-candidate features, for both kinds of training WC."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
                scores, _ = mod.lens_scores(
                    [entries] * ids.shape[0], range(ids.shape[0]), tok, gists, prefix, ids
                )
                cs = scores[:, torch.as_tensor(cand)]
                for w in range(ids.shape[0]):
                    f = features(ids[w], bank[w], prefix, entries, cand)
                    f["lensnet"] = cs[w].numpy()
                    rows.append((utils[w].numpy(), f))
        out[kind] = rows
    return out


def held_out_lens_module(
    gistnet_name: str, lensnet_name: str, n_windows: int
) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """(quickstart config, a LensNetModule over the named exported nets and the quickstart base, held-out code
    windows, held-out retrieval windows): ``n_windows`` of each, as LensNet's validation draws them."""
    from mchar.compose import compose_config
    from mchar.core.gistnet import from_pretrained as gistnet_from
    from mchar.core.lensnet import from_pretrained as lensnet_from
    from mchar.lit.lensnet_module import LensNetModule
    from mchar.pipeline import RunContext
    from mchar.stages.gistnet import load_base
    from mchar.stages.lensnet import lens_training_kwargs, lensnet_windows

    cfg = compose_config(
        [
            "+experiment=quickstart",
            f"name={lensnet_name}",
            f"lensnet.val_windows={n_windows}",
            f"lensnet.val_retrieval_windows={n_windows}",
        ]
    )
    ctx = RunContext(cfg=cfg, tracker=None, run_dir=Path(cfg.run_dir), artifacts_dir=Path(cfg.artifacts_dir))
    base = load_base(ctx)
    art = Path(cfg.artifacts_dir)
    module = LensNetModule(
        base,
        gistnet_from(art / "gistnet" / gistnet_name),
        lensnet_from(art / "lensnet" / lensnet_name),
        **lens_training_kwargs(cfg, 1),
    ).eval()
    _, val, retrieval = lensnet_windows(ctx, base)
    return cfg, module, val, retrieval
