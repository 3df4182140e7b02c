"""Probe (diagnostic, not a test): stream ``lensnet`` blended with the ``lexical`` policy's scores through the real CLI.

Every session's ``lensnet`` policy becomes ``QueryBlendPolicy(lensnet, lexical, BLEND)`` for the whole stream (its
z-scores plus BLEND x the lexical policy's), then the arguments run as ``python -m mchar ...`` would. Measures whether
a fixed mix of LensNet and the lexical retriever beats both (docs/FINDINGS.md, *LensNet's lexical prior over two
seeds*; with ``BLEND_MAX_DF`` / ``BLEND_IDF_POWER`` the blended scorer gets the settle's df cap / IDF power: *Heavier
settle blends and a capped streaming blend*).

Usage: BLEND=1.0 .venv/bin/python scripts/probes/stream_blend.py fit +experiment=heldout_large name=N \\
           'stages=[eval]' eval.split=val 'eval.policies=[lensnet]'
"""

import os
import sys
from typing import Any

from mchar.core.policies import QueryBlendPolicy
from mchar.evals.components import EvalComponents

WEIGHT = float(os.environ.get("BLEND", "1.0"))
# BLEND_MAX_DF=N: the blended lexical scorer ignores tail tokens more than N blocks hold (the settle's df cap), so it
# only speaks when the tail names something rare; BLEND_IDF_POWER likewise (defaults: the plain lexical policy)
LEXICAL = {
    k: cast(os.environ[env])
    for k, env, cast in (("max_df", "BLEND_MAX_DF", int), ("idf_power", "BLEND_IDF_POWER", float))
    if os.environ.get(env)
}
_make_policy = EvalComponents.make_policy


def blended(self: EvalComponents, name: str, lookahead: bool | None = None, **overrides: Any) -> Any:
    policy = _make_policy(self, name, lookahead, **overrides)
    if name != "lensnet":
        return policy
    return QueryBlendPolicy(policy, _make_policy(self, "lexical", lookahead, **LEXICAL), WEIGHT)


EvalComponents.make_policy = blended  # type: ignore[method-assign]

from mchar.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
