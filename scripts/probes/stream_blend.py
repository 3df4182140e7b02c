"""Probe (diagnostic, not a test): stream ``lensnet`` blended with the ``lexical`` policy's scores through the real CLI.

Every session's ``lensnet`` policy becomes ``QueryBlendPolicy(lensnet, lexical, BLEND)`` for the whole stream (its
z-scores plus BLEND x the lexical policy's), then the arguments run as ``python -m mchar ...`` would. Measures whether
a fixed mix of LensNet and the lexical retriever beats both (docs/FINDINGS.md, *LensNet's lexical prior over two
seeds*).

Usage: BLEND=1.0 .venv/bin/python scripts/probes/stream_blend.py fit +experiment=heldout_large name=N \\
           'stages=[eval]' eval.split=val 'eval.policies=[lensnet]'
"""

import os
import sys
from typing import Any

from mchar.core.policies import QueryBlendPolicy
from mchar.evals.components import EvalComponents

WEIGHT = float(os.environ.get("BLEND", "1.0"))
_make_policy = EvalComponents.make_policy


def blended(self: EvalComponents, name: str, lookahead: bool | None = None, **overrides: Any) -> Any:
    policy = _make_policy(self, name, lookahead, **overrides)
    if name != "lensnet":
        return policy
    return QueryBlendPolicy(policy, _make_policy(self, "lexical", lookahead), WEIGHT)


EvalComponents.make_policy = blended  # type: ignore[method-assign]

from mchar.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
