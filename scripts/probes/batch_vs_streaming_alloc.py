"""Probe (diagnostic, not a test): do LensNet's allocations lose in the streaming evaluation or in its scores?

For the evaluation's held-out documents it builds the WC the way LensNet's validation does (on the final prefix,
starting from the recency-first WC, ``lensnet.alloc_rounds`` refocus rounds) and scores the last ``final_tokens``
with it, next to the tiling ``recency`` WC and plain truncation at the same budget, all against full context.
Usage, after the quickstart: .venv/bin/python scripts/probes/batch_vs_streaming_alloc.py [lensnet export dirs...]
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch

from mchar.base.adapter import FrozenBaseLM
from mchar.compose import compose_config
from mchar.core.entries import Entry
from mchar.core.gistnet import from_pretrained as g_from
from mchar.core.lensnet import LensNet
from mchar.lit import windows as W
from mchar.lit.lensnet_module import LensNetModule
from mchar.pipeline import RunContext
from mchar.stages.evaluate import _documents
from mchar.stages.lensnet import lens_training_kwargs

torch.set_grad_enabled(False)
cfg = compose_config(["+experiment=quickstart"] + os.environ.get("OVR", "").split())
root = Path(__file__).resolve().parents[2]
ctx = RunContext(cfg=cfg, tracker=None, run_dir=root / "runs", artifacts_dir=root / "artifacts")
base = FrozenBaseLM.from_pretrained(root / "artifacts/base_lm/quickstart_lm")
gist = g_from(root / "runs/quickstart/gistnet/export")
e, k, budget = cfg.eval, cfg.tree.block_size, cfg.allocator.budget
length = e.history_multiple * budget + e.final_tokens
docs = _documents(ctx, base.tokenizer, length, e.documents)
lens_dirs = sys.argv[1:] or [str(root / "runs/quickstart/lensnet/export")]
cfg.lensnet.horizon = e.final_tokens
results: dict[str, list[float]] = {}
for li, lens_dir in enumerate(lens_dirs):
    mod = LensNetModule(base, gist, LensNet.from_pretrained(lens_dir), **lens_training_kwargs(cfg, 10))
    for d, doc in enumerate(docs):
        ids = doc[None]
        prefix, targets, tok, gists, bank = mod.window_state(ids)
        offs = W.bank_offsets(prefix + mod.horizon, prefix, k, cfg.tree.depth)
        full = W.token_nll(W.teacher_logits(base, ids, prefix, mod.horizon), targets).mean().item()
        gen = np.random.default_rng(d)
        pols = ["lensnet"] + (["recency", "sink_recent", "similarity"] if li == 0 else [])
        spec = [
            (0, *mod.slots(mod.allocate(p, 1, tok, gists, prefix, gen, ids=ids)[0].entries, offs))
            for p in pols
        ]
        if li == 0:  # truncation: the newest raw blocks that fit the budget, nothing else
            n = budget // k
            spec.append((0, *mod.slots([Entry(0, i) for i in range(prefix // k - n, prefix // k)], offs)))
        nll = mod.horizon_nll(bank, spec, prefix, targets)
        names = [f"{p}#{li}" if p == "lensnet" else f"tiling_{p}" for p in pols]
        names += ["truncation"] if li == 0 else []
        for name, v in zip(names, nll.tolist(), strict=True):
            results.setdefault(name, []).append(v - full)
for name, v in results.items():
    a = np.asarray(v)
    print(f"{name:22s} ΔNLL {a.mean():.4f} ± {1.96 * a.std(ddof=1) / np.sqrt(len(a)):.4f} (n={len(a)})")
print("lens dirs:", lens_dirs)
