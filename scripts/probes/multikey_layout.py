"""Probe (diagnostic, not a test): the levels over every multi-key needle's key and value at answer time.

For each multi-key example of an evaluation's task data it streams the prompt through a session per policy exactly as
the lm-eval model does (``stream_ingest``, the settle, a greedy answer) and prints one line: right or wrong, and per
needle in the order of the text the levels of the entries over its key part and its value part (``*`` the asked
needle, ``!`` the needle whose value was answered instead; ``0|00`` = key raw, value over two raw blocks). It ends with
the mean number of *other* needles whose key / value was raw at answer time, for right and wrong answers: whether a
miss is the asked needle not being raw or a distractor's value sitting raw beside it.

Usage: .venv/bin/python scripts/probes/multikey_layout.py LENGTH DATA_RUN [policy ...]
   e.g. .venv/bin/python scripts/probes/multikey_layout.py 512 s40_settle_w4 lensnet random
(the quickstart's nets; ``DATA_RUN``: a run whose ``runs/<run>/eval/task_data/niah_multikey_<LENGTH>.jsonl`` exists;
``LENSNET=<export>`` another LensNet, ``OVR="key=value ..."`` config overrides, e.g. ``allocator.query_churn_guard=false``.)
"""

import os
import re
import statistics
import sys
from pathlib import Path

import torch

from mchar.evals.perplexity import stream_ingest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _task_sessions import quickstart_components, task_examples  # noqa: E402

NEEDLE = re.compile(r"# The special magic number for (\S+) is: (\d+)\.")

torch.set_grad_enabled(False)
length, data_run = int(sys.argv[1]), sys.argv[2]
names = sys.argv[3:] or ["lensnet", "random"]
comp = quickstart_components(os.environ.get("LENSNET", "quickstart"))
tok = comp.base.tokenizer
examples = task_examples(data_run, "niah_multikey", length)


def n_tokens(text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def levels(session, lo: int, hi: int) -> str:
    k = session.wc.block_size
    return "".join(str(e.level) for e in session.wc.entries if e.start(k) < hi and e.end(k) > lo) or "tail"


rows: dict[str, list[tuple[bool, int, int]]] = {n: [] for n in names}
for i, ex in enumerate(examples):
    ctx = ex["context"]
    asked = re.search(r"for (\S+)\?", ex["query"]).group(1)
    prompt = tok.encode(ctx + ex["query"], add_special_tokens=False)
    target = tok.encode(ex["answer"], add_special_tokens=False)
    parts = []
    for name in names:
        s = comp.session(name)
        stream_ingest(s, torch.tensor(prompt, dtype=torch.long))
        s.future_tokens = torch.zeros(0, dtype=torch.long)
        s.refocus_pending()
        answer = s.generate(len(target))
        said = tok.decode(answer).strip()
        shown, raw_keys, raw_values = [], 0, 0
        for m in NEEDLE.finditer(ctx):
            start, key_end = n_tokens(ctx[: m.start()]), n_tokens(ctx[: m.start(2) - 1])
            key, value = levels(s, start, key_end), levels(s, key_end, n_tokens(ctx[: m.end()]))
            mark = "*" if m.group(1) == asked else ("!" if m.group(2) == said else "")
            shown.append(f"{mark}{key}|{value}")
            if m.group(1) != asked:
                raw_keys += set(key) == {"0"}
                raw_values += set(value) == {"0"}
        ok = answer == target
        rows[name].append((ok, raw_keys, raw_values))
        parts.append(f"{name} {'right' if ok else 'wrong'} [{' '.join(shown)}]")
    print(i, f"depth {ex['needle_depth']}:", " | ".join(parts), flush=True)
for name, got in rows.items():
    for ok in (True, False):
        sel = [r for r in got if r[0] == ok]
        if sel:
            print(
                f"{name} {'right' if ok else 'wrong'} {len(sel)}: other needles raw per example, keys "
                f"{statistics.mean(r[1] for r in sel):.2f}, values {statistics.mean(r[2] for r in sel):.2f}"
            )
