"""Probe (diagnostic, not a test): where the passkey needle sits in the working context when a policy answers.

For each passkey example the eval generated (``runs/<run>/eval/task_data/passkey_<length>.jsonl``) it streams the
prompt through a session exactly as the lm-eval model does (``stream_ingest``, ``refocus_pending``, greedy answer)
and prints, per policy: accuracy, and how often the needle's tokens were raw / under an LOD1 / LOD2 gist at answer
time, split by right and wrong answers. It says whether a miss is the focus (needle not raw) or the base (needle raw,
answer still wrong).

Usage, after the quickstart: .venv/bin/python scripts/probes/passkey_focus.py [length] [run] [policy ...]
   e.g. .venv/bin/python scripts/probes/passkey_focus.py 1024 quickstart lensnet similarity
TASK=niah_multikey probes the multi-key needle instead (and counts how many of the other keys' needles were raw at
answer time); EXP=retrieval reads the retrieval experiment's config and base (default: quickstart).
Overrides (e.g. OVR="allocator.query_cooldown=null") go through that config. ``run`` names the LensNet
export; GISTNET=<name> (default: ``run``) the GistNet export and DATA=<run> (default: ``run``) whose task data to read,
e.g. GISTNET=quickstart DATA=quickstart for a LensNet trained over the quickstart's GistNet. SETTLE=<name> settles on
the question with that LensNet export's scores instead (streaming stays with ``run``'s): which of the two fails.
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from mchar.compose import compose_config
from mchar.evals.components import load_components, settings_from_config
from mchar.evals.perplexity import stream_ingest

torch.set_grad_enabled(False)
length = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
run = sys.argv[2] if len(sys.argv) > 2 else "quickstart"
policies = sys.argv[3:] or ["lensnet"]
root = Path(__file__).resolve().parents[2]
cfg = compose_config(
    [f"+experiment={os.environ.get('EXP', 'quickstart')}"] + os.environ.get("OVR", "").split()
)
task = os.environ.get("TASK", "passkey")
base_dir = root / "artifacts/base_lm" / cfg.model.name
comp = load_components(
    base_dir,
    settings_from_config(cfg),
    gistnet=root / "artifacts/gistnet" / os.environ.get("GISTNET", run),
    lensnet=root / "artifacts/lensnet" / run,
)
settle = (
    load_components(
        base_dir,
        settings_from_config(cfg),
        gistnet=root / "artifacts/gistnet" / os.environ.get("GISTNET", run),
        lensnet=root / "artifacts/lensnet" / os.environ["SETTLE"],
    )
    if os.environ.get("SETTLE")
    else None
)
tokenizer = comp.base.tokenizer
data = root / f"runs/{os.environ.get('DATA', run)}/eval/task_data/{task}_{length}.jsonl"
examples = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def needle_span(ex: dict, offset: int | None = None) -> tuple[int, int]:
    """Token range of the needle line (the prompt's tokenisation is prefix-stable at line starts)."""
    offset = ex["needle_char_offset"] if offset is None else offset
    start = len(tokenizer.encode(ex["context"][:offset], add_special_tokens=False))
    line_end = ex["context"].index("\n", offset) + 1
    return start, len(tokenizer.encode(ex["context"][:line_end], add_special_tokens=False))


def distractor_spans(ex: dict) -> list[tuple[int, int]]:
    """Token ranges of the other needles worded like the answer's (multi-key needle's other keys; none for passkey)."""
    ctx, off = ex["context"], ex["needle_char_offset"]
    stem = ctx[off : off + 30]
    found, at = [], ctx.find(stem)
    while at >= 0:
        if at != off:
            found.append(needle_span(ex, at))
        at = ctx.find(stem, at + 1)
    return found


for policy in policies:
    rows = []
    for ex in examples:
        prompt = tokenizer.encode(ex["context"] + ex["query"], add_special_tokens=False)
        target = tokenizer.encode(ex["answer"], add_special_tokens=False)
        s = comp.session(policy)
        if settle is not None:
            s.query_policy = settle.query_policy(settle.make_policy(policy))
        stream_ingest(s, torch.tensor(prompt, dtype=torch.long))
        s.future_tokens = torch.zeros(0, dtype=torch.long)
        lo, hi = needle_span(ex)
        k = s.wc.block_size

        def coarsest(s=s, lo=lo, hi=hi, k=k) -> int:
            return max(e.level for e in s.wc.entries if e.start(k) < hi and e.end(k) > lo)

        streamed = coarsest()  # where the streaming focus left the needle, before the settle on the question
        s.refocus_pending()
        answer = s.generate(len(target))
        raw_others = sum(coarsest(lo=a, hi=b) == 0 for a, b in distractor_spans(ex))
        rows.append((answer == target, coarsest(), ex["needle_depth"], streamed, raw_others))
    right = Counter(lv for ok, lv, *_ in rows if ok)
    wrong = Counter(lv for ok, lv, *_ in rows if not ok)
    acc = sum(ok for ok, *_ in rows) / len(rows)
    print(
        f"{policy} {task}@{length}: acc {acc:.3f} ({len(rows)} examples); coarsest level over the needle at answer "
        f"time, right {dict(sorted(right.items()))}, wrong {dict(sorted(wrong.items()))}; "
        f"wrong at depths {sorted(d for ok, _, d, *_ in rows if not ok)}; before the settle "
        f"{dict(sorted(Counter(st for *_, st, _ in rows).items()))}, of the wrong "
        f"{dict(sorted(Counter(st for ok, *_, st, _ in rows if not ok).items()))}; other needles raw at answer time "
        f"(right / wrong) {dict(sorted(Counter(o for ok, *_, o in rows if ok).items()))} / "
        f"{dict(sorted(Counter(o for ok, *_, o in rows if not ok).items()))}"
    )
