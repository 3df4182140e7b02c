"""Stage ``report``: the Markdown report of the current parent run, also logged as MLflow artifacts.

Runs last in a pipeline, so every earlier stage run of this parent is FINISHED and in the store; the report
is written to ``reports/<cfg.name>.md`` beside the run directory (``<run_dir>/../reports``: the project root
for the default ``run_dir=runs``) so it is readable without MLflow, and logged under ``report/`` so it is
readable without the file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mchar.pipeline import RunContext


def run(ctx: RunContext, run_id: str | None) -> dict[str, Any]:
    from mchar.report import build_report

    if not ctx.tracker.active:  # non-zero DDP rank: rank zero writes the report
        return {}
    out_dir = ctx.run_dir.parent / "reports"
    path = build_report(
        name=ctx.cfg.name,
        experiment=ctx.cfg.logger.experiment_name,
        tracking_uri=ctx.tracker.uri,
        run_id=ctx.tracker.parent_id,
        out_dir=out_dir,
    )
    ctx.tracker.log_artifact(run_id, path, "report")
    figures = sorted(Path(out_dir, ctx.cfg.name).glob("*.png"))
    for fig in figures:
        ctx.tracker.log_artifact(run_id, fig, f"report/{ctx.cfg.name}")
    return {"report": str(path), "figures": [str(f) for f in figures], "metrics": {}}
