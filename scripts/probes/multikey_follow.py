"""Probe (diagnostic, not a test): does the lexical score miss a needle's key block?

The ``lexical`` score reads an entry's span and the block before it, so a needle's *value* block (the block after its
key) scores at least as high as its key block, and a settle with a few edits to spend may open the value blocks of
several needles worded alike while leaving the asked needle's key block a gist: the base then cannot tell which
raw value belongs to the asked key and copies a distractor's (what the quickstart's multi-key misses look like).
This probe builds every :class:`~mchar.core.policies.LexicalPolicy` with ``follow`` = 0 (as shipped) and 1: its
spans reaching one block *forward* as well, which gives a needle's key block its value block's hits and vice versa, and
answers the multi-key examples of an evaluation's task data through the quickstart's nets. It patches the class's
constructor, so a LensNet's own lexical input (served by a ``LexicalPolicy``) changes with the settle's scorer.

Usage: .venv/bin/python scripts/probes/multikey_follow.py LENGTH DATA_RUN [policy ...]
   e.g. .venv/bin/python scripts/probes/multikey_follow.py 512 s40_settle_w4 lensnet random
(``DATA_RUN``: a run whose ``runs/<run>/eval/task_data/niah_multikey_<LENGTH>.jsonl`` exists.)
"""

import json
import sys
from functools import partialmethod
from pathlib import Path

import torch

from mchar.compose import compose_config
from mchar.core import policies as P
from mchar.evals.components import load_components, settings_from_config
from mchar.evals.perplexity import stream_ingest

torch.set_grad_enabled(False)
length, data_run = int(sys.argv[1]), sys.argv[2]
names = sys.argv[3:] or ["lensnet", "random"]
root = Path(__file__).resolve().parents[2]
cfg = compose_config(["+experiment=quickstart"])
comp = load_components(
    root / "artifacts/base_lm" / cfg.model.name,
    settings_from_config(cfg),
    gistnet=root / "artifacts/gistnet/quickstart",
    lensnet=root / "artifacts/lensnet/quickstart",
)
tok = comp.base.tokenizer
examples = [
    json.loads(line)
    for line in (root / f"runs/{data_run}/eval/task_data/niah_multikey_{length}.jsonl")
    .read_text()
    .splitlines()
    if line.strip()
]


shipped_init = P.LexicalPolicy.__init__
for follow in (0, 1):
    # every LexicalPolicy built from here on (the settle's scorer, a LensNet policy's input) reaches ``follow`` forward
    P.LexicalPolicy.__init__ = partialmethod(shipped_init, follow=follow)
    for name in names:
        right = 0
        for ex in examples:
            prompt = tok.encode(ex["context"] + ex["query"], add_special_tokens=False)
            target = tok.encode(ex["answer"], add_special_tokens=False)
            s = comp.session(name)
            stream_ingest(s, torch.tensor(prompt, dtype=torch.long))
            s.future_tokens = torch.zeros(0, dtype=torch.long)
            s.refocus_pending()
            right += s.generate(len(target)) == target
        print(f"follow={follow} {name} niah_multikey@{length}: {right}/{len(examples)}", flush=True)
