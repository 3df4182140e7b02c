"""Probe (diagnostic, not a test): does a LensNet rank the passkey needle's gist first when the question arrives?

For each passkey example an eval generated (``runs/<DATA>/eval/task_data/passkey_<length>.jsonl``) it streams the
prompt through a ``lensnet`` session exactly as the lm-eval model does (``stream_ingest``), then, before any settle,
scores the working context with the LensNet and reports where the entry holding the needle ranks among the gist
entries (the ones an expand can open). A LensNet that fetches puts it first; one whose training targets taught it
only what to keep does not. Examples whose needle streaming left raw are skipped (nothing to fetch).

Usage, after the quickstart: .venv/bin/python scripts/probes/needle_rank.py [length] [lensnet export ...]
   e.g. DATA=quickstart .venv/bin/python scripts/probes/needle_rank.py 1024 quickstart
GISTNET=<name> (default: quickstart) the GistNet export, DATA=<run> (default: quickstart) whose task data to read.
"""

import os
import statistics
import sys
from pathlib import Path

import torch

from mchar.core.policies import PolicyContext
from mchar.evals.perplexity import stream_ingest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _task_sessions import quickstart_components, task_examples  # noqa: E402

torch.set_grad_enabled(False)
length = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
lensnets = sys.argv[2:] or ["quickstart"]
examples = task_examples(os.environ.get("DATA", "quickstart"), "passkey", length)

for name in lensnets:
    comp = quickstart_components(name)
    tokenizer = comp.base.tokenizer
    ranks, z_scores = [], []
    for ex in examples:
        s = comp.session("lensnet")
        prompt = tokenizer.encode(ex["context"] + ex["query"], add_special_tokens=False)
        stream_ingest(s, torch.tensor(prompt, dtype=torch.long))
        s.future_tokens = torch.zeros(0, dtype=torch.long)
        needle = len(tokenizer.encode(ex["context"][: ex["needle_char_offset"]], add_special_tokens=False))
        k, entries = s.wc.block_size, list(s.wc.entries)
        holder = next(i for i, e in enumerate(entries) if e.start(k) <= needle < e.end(k))
        if entries[holder].level == 0:
            continue
        context = PolicyContext(base_lm=s.base, future_tokens=s.future_tokens, position_mode=s.position_mode)
        scores = s.policy.scores(s.wc, s.tree, context).float()
        gists = sorted((i for i, e in enumerate(entries) if e.level > 0), key=lambda i: -float(scores[i]))
        ranks.append(gists.index(holder))
        z_scores.append(float((scores[holder] - scores.mean()) / scores.std()))
    if not ranks:
        print(f"{name} passkey@{length}: every needle raw at the question")
        continue
    print(
        f"{name} passkey@{length}: needle under a gist in {len(ranks)} of {len(examples)}; its rank among the gists "
        f"by LensNet's score: first in {sum(r == 0 for r in ranks)}, top 3 in {sum(r < 3 for r in ranks)}, median "
        f"{statistics.median(ranks)}; its z-score median {statistics.median(z_scores):.2f}"
    )
