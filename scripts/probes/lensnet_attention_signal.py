"""Probe (diagnostic, not a test): does the frozen base's own attention (last Q prefix slots -> WC entries) rank
LensNet's measured utilities? Usage, after the quickstart: .venv/bin/python scripts/probes/lensnet_attention_signal.py
"""

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
from mchar.lit import windows as W
from mchar.lit.lensnet_module import LensNetModule
from mchar.pipeline import RunContext
from mchar.stages.gistnet import load_windows, retrieval_windows
from mchar.stages.lensnet import lens_training_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _utility_rows import utility_rows  # noqa: E402

torch.set_grad_enabled(False)
cfg = compose_config(["+experiment=quickstart"] + os.environ.get("OVR", "").split())
root = Path(__file__).resolve().parents[2]
ctx = RunContext(cfg=cfg, tracker=None, run_dir=root / "runs", artifacts_dir=root / "artifacts")
base = FrozenBaseLM.from_pretrained(root / "artifacts/base_lm/quickstart_lm")
try:
    base.model.set_attn_implementation("eager")
except Exception as e:
    print("set_attn", e)
    base.model.config._attn_implementation = "eager"
gist = g_from(root / "runs/quickstart/gistnet/export")
lens = LensNet.from_pretrained(root / "runs/quickstart/lensnet/export")
mod = LensNetModule(base, gist, lens, **lens_training_kwargs(cfg, 10))
_, val = load_windows(ctx, base, 64)
rv = retrieval_windows(ctx, base.tokenizer, 32)
K = cfg.tree.block_size
Q = int(os.environ.get("Q", 16))


def attn_scores(bank_w, entries, prefix, offs):
    b, p = W.prefix_slots(entries, K, offs, "centre")
    emb = bank_w[torch.as_tensor(b)].unsqueeze(0)
    pos = torch.as_tensor(p).unsqueeze(0)
    out = base.model(
        inputs_embeds=emb,
        position_ids=pos,
        attention_mask=torch.ones_like(pos),
        output_attentions=True,
        use_cache=False,
    )
    att = torch.stack(out.attentions)  # [L, 1, H, S, S]
    a = att[:, 0, :, -Q:, :].mean(2)  # [L, H, S]
    ent = np.repeat(np.arange(len(entries)), [K if e.level == 0 else 1 for e in entries])
    seg = torch.as_tensor(ent)
    res = {}
    for name, x in (("all", a.mean((0, 1))), ("last", a[-1].mean(0)), ("maxhead", a.amax(1).mean(0))):
        s = torch.zeros(len(entries)).index_add_(0, seg, x.float())
        res["att_" + name] = s.numpy()
        cnt = torch.zeros(len(entries)).index_add_(0, seg, torch.ones_like(x.float()))
        res["attmean_" + name] = (s / cnt).numpy()
    return res


def features(ids, bank_w, prefix, entries, cand):
    offs = W.bank_offsets(prefix + mod.horizon, prefix, K, cfg.tree.depth)
    f = {k: v[cand] for k, v in attn_scores(bank_w, entries, prefix, offs).items()}
    f["neg_dist"] = np.array([-np.log1p(prefix - entries[int(i)].end(K)) for i in cand])
    return f


def run(name, wins, bs=4):
    res = {}
    for kind, rows in utility_rows(mod, wins, features, bs).items():
        out = {
            key: float(np.nanmean([spearmanr(f[key], u).statistic for u, f in rows])) for key in rows[0][1]
        }
        for a in (0.5, 1.0, 2.0):
            for key in ("att_all", "attmean_all"):
                out[f"d+{a}z{key}"] = float(
                    np.nanmean(
                        [
                            spearmanr(
                                f["neg_dist"] / max(1e-9, f["neg_dist"].std())
                                + a * f[key] / max(1e-12, f[key].std()),
                                u,
                            ).statistic
                            for u, f in rows
                        ]
                    )
                )
        out["n"] = len(rows)
        res[kind] = out
    for kind, v in res.items():
        print(name, kind, " ".join(f"{k}={x:.3f}" for k, x in v.items()), flush=True)


t0 = time.time()
run("code", val)
run("retrieval", rv)
print("secs", time.time() - t0)
