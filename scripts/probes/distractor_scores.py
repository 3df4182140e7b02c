"""Probe (diagnostic, not a test): how a LensNet values the asked needle's value and the distractors' at the question.

The multi-key misses come from a distractor's value left raw beside the asked one, and a settle fills its free slots
by LensNet's own ranking (docs/FINDINGS.md, *The churn guard at the settle*). For each multi-key example an eval
generated (``runs/<DATA_RUN>/eval/task_data/niah_multikey_<LENGTH>.jsonl``) this streams the prompt through a
``lensnet`` session (``stream_ingest``), lays the history out as one LOD1 gist per block (the protected tail as the
session left it), and z-scores those gists with the LensNet, the question in its tail. It prints, per LensNet, the mean
z-score of the blocks holding the asked value, the distractors' values, the other needle blocks and the haystack, and
how often the best distractor-value block outranks the best haystack block: whether the net learned that a number is
worth nothing unless the question asks for it.

Usage: .venv/bin/python scripts/probes/distractor_scores.py LENGTH DATA_RUN [lensnet export ...]
   e.g. .venv/bin/python scripts/probes/distractor_scores.py 512 s44_tlv_base quickstart s44_settle10
(the quickstart's base and GistNet; exports under ``artifacts/lensnet/``.)
"""

import re
import statistics
import sys
from pathlib import Path

import torch

from mchar.core.entries import Entry
from mchar.core.policies import PolicyContext
from mchar.core.working_context import WorkingContext
from mchar.evals.perplexity import stream_ingest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _task_sessions import quickstart_components, task_examples  # noqa: E402

NEEDLE = re.compile(r"# The special magic number for (\S+) is: (\d+)\.")

torch.set_grad_enabled(False)
length, data_run = int(sys.argv[1]), sys.argv[2]
lensnets = sys.argv[3:] or ["quickstart"]
examples = task_examples(data_run, "niah_multikey", length)

for name in lensnets:
    comp = quickstart_components(name)
    tok = comp.base.tokenizer

    def n_tokens(text: str, tok=tok) -> int:  # noqa: ANN001
        return len(tok.encode(text, add_special_tokens=False))

    z: dict[str, list[float]] = {
        "asked value": [],
        "distractor value": [],
        "other needle": [],
        "haystack": [],
    }
    outranks = 0
    for ex in examples:
        ctx, asked = ex["context"], re.search(r"for (\S+)\?", ex["query"]).group(1)
        s = comp.session("lensnet")
        stream_ingest(
            s, torch.tensor(tok.encode(ctx + ex["query"], add_special_tokens=False), dtype=torch.long)
        )
        k, wc = s.wc.block_size, s.wc
        tail = wc.num_tokens - s.allocator.protect_tokens
        kept = [e for e in wc.entries if e.start(k) >= tail]  # the protected tail, as the session left it
        first = kept[0].start(k) // k if kept else wc.num_tokens // k
        layout = WorkingContext(
            k, wc.depth, 1 << 30, wc.num_tokens, entries=[Entry(1, b) for b in range(first)] + kept
        )
        scores = s.policy.scores(layout, s.tree, PolicyContext(base_lm=s.base))[:first]
        kind = ["haystack"] * first
        for m in NEEDLE.finditer(ctx):
            start, key_end, end = (
                n_tokens(ctx[: m.start()]),
                n_tokens(ctx[: m.start(2) - 1]),
                n_tokens(ctx[: m.end()]),
            )
            value = "asked value" if m.group(1) == asked else "distractor value"
            for b in range(start // k, min((end - 1) // k + 1, first)):
                holds_value = b * k < end and (b + 1) * k > key_end
                if kind[b] != "asked value":
                    kind[b] = value if holds_value else "other needle"
        for b, c in enumerate(kind):
            z[c].append(float(scores[b]))
        best = {c: max((float(scores[b]) for b in range(first) if kind[b] == c), default=-9.0) for c in z}
        outranks += best["distractor value"] > best["haystack"]
    cells = ", ".join(f"{c} {statistics.mean(v):+.2f} ({len(v)})" for c, v in z.items() if v)
    print(
        f"{name}: mean z {cells}; best distractor value above best haystack block in {outranks}/{len(examples)}"
    )
