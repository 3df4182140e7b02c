"""What the task probes share: the quickstart's components with a chosen LensNet, and an eval's generated examples."""

import json
import os
from pathlib import Path
from typing import Any

from mchar.compose import compose_config
from mchar.evals.components import load_components, settings_from_config

ROOT = Path(__file__).resolve().parents[2]


def quickstart_components(lensnet: str = "quickstart", gistnet: str | None = None) -> Any:
    """The quickstart's base, ``artifacts/gistnet/<gistnet>`` (default: ``$GISTNET`` or quickstart) and
    ``artifacts/lensnet/<lensnet>``, under the quickstart's settings plus the overrides in ``$OVR`` (e.g.
    ``OVR="allocator.query_churn_guard=false"``)."""
    cfg = compose_config(["+experiment=quickstart", *os.environ.get("OVR", "").split()])
    return load_components(
        ROOT / "artifacts/base_lm" / cfg.model.name,
        settings_from_config(cfg),
        gistnet=ROOT / "artifacts/gistnet" / (gistnet or os.environ.get("GISTNET", "quickstart")),
        lensnet=ROOT / "artifacts/lensnet" / lensnet,
    )


def task_examples(run: str, task: str, length: int) -> list[dict[str, Any]]:
    """The examples eval run ``run`` generated for ``task`` at ``length`` tokens."""
    path = ROOT / f"runs/{run}/eval/task_data/{task}_{length}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
