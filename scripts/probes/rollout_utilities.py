"""Probe (diagnostic, not a test): an entry's value over a sequence of refocuses, against its single-entry utility.

LensNet trains on single-entry utilities: the horizon-NLL gain of one entry one step finer in a fixed WC. A session
does not keep a WC fixed: it refocuses every block, so what a finer entry is worth is what it is worth while the
policy goes on editing around it (and maybe undoes it). This probe measures that *rollout* utility at the WCs a
streaming session holds: each held-out window streams through a fresh session of POLICY to a cursor (512 and 768
tokens), C random entries of its WC are forced one step finer (a gist expanded, a raw block collapsed: the same edits
LensNet's targets perturb, with the budget raised by one block for baseline and variants alike so the expansion
fits), and the session then scores the next 64 tokens as the evaluation does (refocusing every block on the
policy's scores). Rollout utility = the 64 tokens' NLL gain of the finer entry, signed as LensNet's targets are.
Printed per window kind: each scorer's mean per-snapshot Spearman / stake agreement against the rollout utilities
and against the single-entry utilities of the same candidates, the rollout utilities' odd/even split-half, and the
Spearman between the two utilities.

    # after `python -m mchar fit +experiment=quickstart`:
    python scripts/probes/rollout_utilities.py [LENSNET_NAME [N_WINDOWS [CANDIDATES [POLICY]]]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mchar.evals.perplexity import stream_ingest, stream_score
from mchar.lit.lensnet_module import per_window_spearman, stake_agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _task_sessions import quickstart_components  # noqa: E402
from _utility_rows import held_out_lens_module  # noqa: E402
from session_utilities import SCORERS, scorer_scores  # noqa: E402

CURSORS = (512, 768)
HORIZON = 64


def session_at(comp, policy: str, window: torch.Tensor, cursor: int):
    """A fresh session of ``policy`` that has streamed ``window[:cursor]`` as the evaluation streams a document."""
    session = comp.session(policy)
    stream_ingest(session, window[:cursor], future=window[cursor : cursor + HORIZON])
    return session


def rollout_nll(
    comp, policy: str, window: torch.Tensor, cursor: int, force: int | None
) -> tuple[torch.Tensor, list]:
    """Per-token NLL ``[HORIZON]`` of the tokens after ``cursor``, scored by a session whose WC at the cursor had
    entry ``force`` one step finer (None: as the policy left it), the budget one block larger either way; and the
    WC's entries at the cursor before the edit."""
    session = session_at(comp, policy, window, cursor)
    entries = list(session.wc.entries)
    session.budget += session.block_size
    wc = session.wc.copy(budget=session.budget)
    if force is not None:
        if wc[force].level > 0:
            wc.expand(force)
        else:
            wc.collapse(force)
    session.wc = wc
    return -stream_score(session, window[cursor : cursor + HORIZON]), entries


def main(
    lensnet_name: str = "quickstart", n_windows: int = 16, candidates: int = 8, policy: str = "lensnet"
) -> None:
    torch.set_grad_enabled(False)
    cfg, module, val, retrieval = held_out_lens_module("quickstart", lensnet_name, n_windows)
    comp = quickstart_components(lensnet_name)
    rows: dict[str, list[dict[str, float]]] = {}
    for set_name, data in (("code", val), ("retrieval", retrieval)):
        for w in range(data.shape[0]):
            window = data[w]
            for c in CURSORS:
                gen = np.random.default_rng([w, c, 11])
                base, entries = rollout_nll(comp, policy, window, c, None)
                legal = [
                    i for i, e in enumerate(entries) if e.start(module.k) < c - module.k
                ]  # the newest block stays raw: the session protects it
                cand = np.sort(gen.choice(legal, size=min(candidates, len(legal)), replace=False))
                gains = []
                for i in cand:
                    var, _ = rollout_nll(comp, policy, window, c, int(i))
                    gains.append((base - var) if entries[int(i)].level > 0 else (var - base))
                per_token = torch.stack(gains).unsqueeze(0)  # [1, C, H]
                rollout = per_token.mean(-1)
                ids = window[: c + module.horizon].unsqueeze(0)
                state = module.window_state(ids)
                prefix, targets, _, _, bank = state
                static = module.measure_utilities(bank, entries, cand, prefix, targets)
                scores = scorer_scores(module, state, ids, entries, cand, gen)
                half = per_window_spearman(per_token[..., 0::2].mean(-1), per_token[..., 1::2].mean(-1))
                row = {
                    "split_half": float(half[0]),
                    "rollout~static": float(per_window_spearman(rollout, static)[0]),
                }
                for name, s in scores.items():
                    for target, u in (("rollout", rollout), ("static", static)):
                        row[f"{name}/{target}/spearman"] = float(per_window_spearman(s.float(), u)[0])
                        row[f"{name}/{target}/stake"] = float(stake_agreement(s.float(), u)[0])
                rows.setdefault(set_name, []).append(row)
    print(f"policy streamed: {policy}; LensNet: {lensnet_name}; cursors {CURSORS}; {candidates} candidates")
    for set_name, rs in rows.items():
        mean = {key: float(np.nanmean([r[key] for r in rs])) for key in rs[0]}
        print(
            f"{set_name}: {len(rs)} snapshots; rollout split-half {mean['split_half']:.3f}; "
            f"Spearman(rollout, single-entry) {mean['rollout~static']:.3f}"
        )
        for target in ("rollout", "static"):
            cells = "  ".join(
                f"{s} {mean[f'{s}/{target}/spearman']:.3f} / {mean[f'{s}/{target}/stake']:.3f}"
                for s in SCORERS
            )
            print(f"  against {target:7s} utilities (Spearman / stake): {cells}")


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(n) for n in sys.argv[2:4]), *sys.argv[4:5])
