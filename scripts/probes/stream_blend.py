"""Probe (diagnostic, not a test): stream ``lensnet`` blended with the ``lexical`` policy's scores through the real CLI.

Every session's ``lensnet`` policy becomes ``QueryBlendPolicy(lensnet, lexical, BLEND)`` for the whole stream (its
z-scores plus BLEND x the lexical policy's), then the arguments run as ``python -m mchar ...`` would. Measures whether
a fixed mix of LensNet and the lexical retriever beats both (docs/FINDINGS.md, *LensNet's lexical prior over two
seeds*; with ``BLEND_MAX_DF`` / ``BLEND_IDF_POWER`` the blended scorer gets the settle's df cap / IDF power: *Heavier
settle blends and a capped streaming blend*). With ``BLEND_GATE=G`` the blend applies only at refocuses where the
lexical score stands out (its largest z-score over the WC is at least G, as one block holding the tail's rare key
does) and LensNet ranks alone otherwise; ``BLEND_GATE_BELOW=1`` inverts the gate (the blend only where no entry
stands out) (*A streaming blend gated on a standout match*).

Usage: BLEND=1.0 .venv/bin/python scripts/probes/stream_blend.py fit +experiment=heldout_large name=N \\
           'stages=[eval]' eval.split=val 'eval.policies=[lensnet]'
"""

import os
import sys
from typing import Any

from mchar.core.policies import QueryBlendPolicy, blend_scores, standardise
from mchar.evals.components import EvalComponents

WEIGHT = float(os.environ.get("BLEND", "1.0"))
# BLEND_MAX_DF=N: the blended lexical scorer ignores tail tokens more than N blocks hold (the settle's df cap), so it
# only speaks when the tail names something rare; BLEND_IDF_POWER likewise (defaults: the plain lexical policy)
LEXICAL = {
    k: cast(os.environ[env])
    for k, env, cast in (("max_df", "BLEND_MAX_DF", int), ("idf_power", "BLEND_IDF_POWER", float))
    if os.environ.get(env)
}
GATE = float(os.environ["BLEND_GATE"]) if os.environ.get("BLEND_GATE") else None
BELOW = os.environ.get("BLEND_GATE_BELOW", "") not in ("", "0")
_make_policy = EvalComponents.make_policy


class GatedBlend(QueryBlendPolicy):
    """The blend where the lexical score has a standout entry (max z-score >= GATE; below it with BELOW), LensNet
    alone elsewhere."""

    gated = opened = 0

    def scores(self, wc: Any, tree: Any, context: Any = None) -> Any:
        query = self.query.scores(wc, tree, context)
        own = self.policy.scores(wc, tree, context)
        GatedBlend.gated += 1
        if len(query) > 1 and (float(standardise(query).max()) >= GATE) != BELOW:
            GatedBlend.opened += 1
            return blend_scores(own, query, self.weight)
        return standardise(own)


def blended(self: EvalComponents, name: str, lookahead: bool | None = None, **overrides: Any) -> Any:
    policy = _make_policy(self, name, lookahead, **overrides)
    if name != "lensnet":
        return policy
    cls = QueryBlendPolicy if GATE is None else GatedBlend
    return cls(policy, _make_policy(self, "lexical", lookahead, **LEXICAL), WEIGHT)


EvalComponents.make_policy = blended  # type: ignore[method-assign]

from mchar.cli import main  # noqa: E402

code = main(sys.argv[1:])
if GATE is not None:
    print(f"[stream_blend] gate {GATE}: blended at {GatedBlend.opened} of {GatedBlend.gated} refocuses")
sys.exit(code)
