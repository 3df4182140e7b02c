"""Stage runs logged with real MLflow client calls, shaped like the pipeline's (the report and compare tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def log_stage_run(
    client: Any,
    exp: str,
    parent: str,
    *,
    name: str,
    stage: str,
    argv: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    finished: bool = False,
) -> str:
    """One stage run nested under ``parent`` with the tags the reports select on; returns its run id."""
    rid = client.create_run(
        exp,
        run_name=f"{name}/{stage}",
        tags={"mlflow.parentRunId": parent, "mchar.stage": stage, "mchar.role": "stage", "argv": argv},
    ).info.run_id
    for k, v in {"name": name, **params}.items():
        client.log_param(rid, k, str(v))
    for k, v in (metrics or {}).items():
        client.log_metric(rid, k, v)
    if finished:
        client.set_terminated(rid)
    return rid
