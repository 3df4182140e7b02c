"""Probe (diagnostic, not a test): do the scorers rank LensNet's single-entry utilities better on the working
contexts a streaming session actually holds than on the random WCs LensNet trains and validates on?

The quickstart's LensNet streams code better with its lexical prior (stop 40: −0.097 nats on 120 held-out code
documents) although the lexical score ranks the validation WCs' utilities at ~0.01. Either the random WCs are not
where a session decides (then harvesting session states would give better targets), or the prior's streaming gain
is not one of single-entry utilities at all. This probe streams each held-out window (LensNet's own validation
windows, 1,024 tokens) through a session of the given policy, exactly as the evaluation does (``stream_ingest``),
snapshots its WC at cursors every 128 tokens from 384 on, and measures at each snapshot the same utilities LensNet
trains on (the horizon-NLL gain of one entry one step finer, sampled and in expectation) for up to 16 random
entries. It prints, per window kind, each scorer's mean per-snapshot Spearman and stake agreement (the gap-weighted
share of pairs ordered right) against them, next to the same numbers on the validation's random WCs of the same
windows and the utilities' odd/even split-half agreement.

    # after `python -m mchar fit +experiment=quickstart`:
    python scripts/probes/session_utilities.py [LENSNET_NAME [N_WINDOWS [POLICY]]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mchar.core.working_context import WorkingContext
from mchar.evals.perplexity import stream_ingest
from mchar.lit.lensnet_module import per_window_spearman, stake_agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _task_sessions import quickstart_components  # noqa: E402
from _utility_rows import held_out_lens_module  # noqa: E402

SCORERS = ("lensnet", "recency", "similarity", "lexical")
CURSORS = range(384, 1024 - 64 + 1, 128)


def session_snapshots(comp, policy: str, window: torch.Tensor, k: int) -> dict[int, list]:
    """The session's WC entries at every cursor of ``CURSORS`` while ``window`` streams through it."""
    session, done, out = comp.session(policy), 0, {}
    for c in CURSORS:
        stream_ingest(session, window[done:c], future=window[c : c + 64])
        done = c
        entries = list(session.wc.entries)
        covered = sum(e.width(k) for e in entries)
        if covered != c:
            raise RuntimeError(f"the session's WC covers {covered} tokens at cursor {c}")
        out[c] = entries
    return out


def scorer_scores(
    module, state: tuple, ids: torch.Tensor, entries: list, cand: np.ndarray, gen: np.random.Generator
) -> dict[str, torch.Tensor]:
    """``{scorer: [1, C]}``: each scorer's scores of the candidates ``cand`` of one WC of one window ``ids``
    (``state``: the window's ``module.window_state(ids)``)."""
    prefix, _, tok, gists, _ = state
    wc = WorkingContext(module.k, module.depth, 1 << 30, prefix, entries=entries)
    picked = torch.as_tensor(cand)
    scores = {"lensnet": module.lens_scores([entries], [0], tok, gists, prefix, ids)[0][:, picked]}
    for p in SCORERS[1:]:
        scores[p] = torch.stack(module.policy_scores(p, [wc], tok, gists, prefix, gen, ids=ids))[:, picked]
    return scores


def measure(
    module, ids: torch.Tensor, entries: list, gen: np.random.Generator
) -> dict[str, dict[str, float]]:
    """Each scorer's Spearman / stake agreement against one WC's sampled and expected utilities (one window)."""
    state = module.window_state(ids)
    prefix, targets, _, _, bank = state
    entries, cand = module.planner.pick(entries, gen)
    plan = module.plan_for(entries, cand, prefix, bank)
    logits = module.variant_logits(bank, plan)
    teacher = module.teacher(ids, prefix)
    scores = scorer_scores(module, state, ids, entries, cand, gen)
    out: dict[str, dict[str, float]] = {}
    for measure_name, t in (("sampled", None), ("expected", teacher)):
        per_token = module.utilities_from(logits, plan, targets, t, True)
        u = per_token.mean(-1)
        half = per_window_spearman(per_token[..., 0::2].mean(-1), per_token[..., 1::2].mean(-1))
        out[measure_name] = {"split_half": float(half[0])}
        for name, s in scores.items():
            out[measure_name][f"{name}/spearman"] = float(per_window_spearman(s.float(), u)[0])
            out[measure_name][f"{name}/stake"] = float(stake_agreement(s.float(), u)[0])
    return out


def main(lensnet_name: str = "quickstart", n_windows: int = 16, policy: str = "lensnet") -> None:
    torch.set_grad_enabled(False)
    cfg, module, val, retrieval = held_out_lens_module("quickstart", lensnet_name, n_windows)
    comp = quickstart_components(lensnet_name)
    k = cfg.tree.block_size
    rows: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for set_name, data in (("code", val), ("retrieval", retrieval)):
        for w in range(data.shape[0]):
            window = data[w]
            snaps = session_snapshots(comp, policy, window, k)
            for c, entries in snaps.items():
                ids = window[: c + module.horizon].unsqueeze(0)
                gen = np.random.default_rng([w, c, 7])
                for m, res in measure(module, ids, entries, gen).items():
                    rows.setdefault((set_name, m, "session"), []).append(res)
                # the validation's kind of WC at the same cursor: a random session-like one and a random fill
                for kind in ("recent", "fill"):
                    rand_entries, _ = module.val_planner.sample(-(w * 1000 + c), c, kind)
                    for m, res in measure(module, ids, rand_entries, gen).items():
                        rows.setdefault((set_name, m, kind), []).append(res)
    print(f"policy streamed: {policy}; LensNet: {lensnet_name}; {n_windows} windows of each kind")
    print("windows    utilities WCs      n    split-half " + " ".join(f"{s:>19s}" for s in SCORERS))
    print(" " * 48 + " ".join(f"{'spearman / stake':>19s}" for _ in SCORERS))
    for (set_name, m, kind), rs in sorted(rows.items()):
        mean = {key: float(np.nanmean([r[key] for r in rs])) for key in rs[0]}
        cells = " ".join(f"{mean[f'{s}/spearman']:>10.3f} / {mean[f'{s}/stake']:.3f}" for s in SCORERS)
        print(f"{set_name:10s} {m:9s} {kind:8s} {len(rs):4d} {mean['split_half']:10.3f} {cells}")


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(n) for n in sys.argv[2:3]), *sys.argv[3:4])
