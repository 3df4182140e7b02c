"""lm-eval loads the data of the local mchar tasks through this shim (see mchar.evals.make_tasks)."""

from mchar.evals.make_tasks import load_split

__all__ = ["load_split"]
