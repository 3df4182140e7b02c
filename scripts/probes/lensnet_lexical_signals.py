"""Probe (diagnostic, not a test): Spearman of cheap per-entry signals (distance, tail-token overlap, tail bigrams; the
horizon's own bigrams as a cheating ceiling) against LensNet's measured utilities on held-out quickstart windows.

Usage, after the quickstart: .venv/bin/python scripts/probes/lensnet_lexical_signals.py 32 \
    runs/quickstart/gistnet/export runs/quickstart/lensnet/export   (OVR="lensnet.horizon=16" for other overrides)
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from mchar.base.adapter import FrozenBaseLM
from mchar.compose import compose_config
from mchar.core.gistnet import from_pretrained as g_from
from mchar.core.lensnet import LensNet
from mchar.lit.lensnet_module import LensNetModule
from mchar.pipeline import RunContext
from mchar.stages.gistnet import load_windows, retrieval_windows
from mchar.stages.lensnet import build_lensnet, lens_training_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _utility_rows import utility_rows  # noqa: E402

torch.set_grad_enabled(False)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 32

cfg = compose_config(["+experiment=quickstart"] + os.environ.get("OVR", "").split())
root = Path(__file__).resolve().parents[2]
ctx = RunContext(cfg=cfg, tracker=None, run_dir=root / "runs", artifacts_dir=root / "artifacts")
base = FrozenBaseLM.from_pretrained(root / "artifacts/base_lm/quickstart_lm")
gist = g_from(sys.argv[2]) if len(sys.argv) > 2 else None
lens = LensNet.from_pretrained(sys.argv[3]) if len(sys.argv) > 3 else build_lensnet(ctx, base)
mod = LensNetModule(base, gist, lens, **lens_training_kwargs(cfg, 10))
lc = cfg.lensnet
_, val = load_windows(ctx, base, N)
rv = retrieval_windows(ctx, base.tokenizer, N)
print("windows", val.shape, rv.shape, flush=True)
K = cfg.tree.block_size


def feats(ids, prefix, entries, cand):
    tail = ids[prefix - 32 : prefix].tolist()
    t16 = set(ids[prefix - 16 : prefix].tolist())
    bigr = set(zip(tail[:-1], tail[1:], strict=False))
    last = ids[prefix - 1].item()
    fut = ids[prefix : prefix + mod.horizon].tolist()
    fbig = set(zip(fut[:-1], fut[1:], strict=False))
    out = {k: [] for k in ("neg_dist", "uni16", "bigram", "lastmatch", "fut_bigram", "fut_uni")}
    for i in cand:
        e = entries[int(i)]
        a, b = e.start(K), e.end(K)
        span = ids[a:b].tolist()
        out["neg_dist"].append(-np.log1p(prefix - b))
        out["uni16"].append(np.mean([t in t16 for t in span]))
        sb = list(zip(span[:-1], span[1:], strict=False))
        out["bigram"].append(np.log1p(sum(x in bigr for x in sb)))
        out["lastmatch"].append(np.log1p(sum(t == last for t in span[:-1])))
        out["fut_bigram"].append(np.log1p(sum(x in fbig for x in sb)))
        out["fut_uni"].append(np.mean([t in set(fut) for t in span]))
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def run(name, wins, bs=4):
    res = {}
    lexical = lambda ids, _bank, prefix, entries, cand: feats(ids, prefix, entries, cand)  # noqa: E731
    for kind, rows in utility_rows(mod, wins, lexical, bs).items():
        out = {}
        for key in rows[0][1]:
            rs = [spearmanr(f[key], u).statistic for u, f in rows]
            out[key] = float(np.nanmean(rs))
        for a in (0.5, 1.0, 2.0):
            for key in ("bigram", "lastmatch", "uni16"):
                rs = [spearmanr(f["neg_dist"] + a * f[key] / max(1e-9, 1), u).statistic for u, f in rows]
                out[f"dist+{a}*{key}"] = float(np.nanmean(rs))
        out["n"] = len(rows)
        out["util_abs"] = float(np.mean([np.abs(u).mean() for u, _ in rows]))
        res[kind] = out
    print(name, json.dumps(res, indent=1), flush=True)


t0 = time.time()
run("code", val)
run("retrieval", rv)
print("secs", time.time() - t0)
