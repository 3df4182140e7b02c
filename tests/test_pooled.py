"""``report --pool``: seed replicates' task outcomes pooled, from a real SQLite MLflow store filled by real client calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mchar.cli import main
from mchar.errors import MCharError
from mchar.evals.paired_tasks import mcnemar_exact
from mchar.pooled import build_pooled

from .mlflow_runs import log_stage_run

TASK = "mchar_niah_multikey_1024"


def _eval_run(client: Any, exp: str, name: str, seed: int, budget: int = 128) -> str:
    parent = client.create_run(exp, run_name=f"fit:{name}", tags={"mchar.role": "parent"}).info.run_id
    rid = log_stage_run(
        client,
        exp,
        parent,
        name=name,
        stage="eval",
        argv=f"python -m mchar fit +experiment=tasks_large name={name} seed={seed}",
        params={
            "seed": seed,
            "allocator.budget": budget,
            "tree.depth": 2,
            "tree.block_size": 16,
            "eval.task_examples": 10,
            "eval.split": "test",
        },
        finished=True,
    )
    client.set_terminated(parent)
    return rid


def _log_outcomes(client: Any, tmp: Path, rid: str, seed: int, right: dict[str, set[int]]) -> None:
    """Ten examples per run whose answers follow the seed (as the task data do), each policy right on ``right``."""
    for policy, ok in right.items():
        rows = [
            {
                "task": TASK,
                "doc_id": d,
                "target": f" {seed}{d:04d}",
                "exact_match": float(d in ok),
                "doc": {"id": f"niah-1024-{d:04d}"},
            }
            for d in range(10)
        ]
        path = tmp / f"task_samples_{policy}_local.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(rid, str(path), "eval/lm_eval")


def populate(tmp: Path) -> tuple[str, Any, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("mchar", artifact_location=(tmp / "mlartifacts").as_uri())
    # seed 0: lensnet right on 0-7, lexical on 0-9 -> lexical alone on 8, 9
    _log_outcomes(
        client, tmp, _eval_run(client, exp, "s0", 0), 0, {"lensnet": set(range(8)), "lexical": set(range(10))}
    )
    # seed 1: lensnet right on 0-9, lexical on 0-6 -> lensnet alone on 7, 8, 9
    _log_outcomes(
        client, tmp, _eval_run(client, exp, "s1", 1), 1, {"lensnet": set(range(10)), "lexical": set(range(7))}
    )
    return uri, client, exp


def test_replicates_pool_and_pair_within_each_run(tmp_path: Path) -> None:
    uri, _, _ = populate(tmp_path)
    out = tmp_path / "r"
    md = build_pooled(["s0", "s1"], "pooled", tracking_uri=uri, out_dir=out).read_text()
    # lensnet 8 + 10 of 20; lexical 10 + 7 of 20; discordant: lexical alone 2 (seed 0), lensnet alone 3 (seed 1)
    assert f"| {TASK} | lensnet | 0.8 | 1 | 0.9 | 20 |  |  |  |" in md
    assert f"| {TASK} | lexical | 1 | 0.7 | 0.85 | 20 | 3 | 2 | {mcnemar_exact(3, 2):.4g} |" in md
    assert (out / "pooled" / "task_accuracy.png").stat().st_size > 0
    sources = json.loads((out / "pooled" / "sources.json").read_text())
    assert sources["pooled"] == ["s0", "s1"] and sources["reference"] == "lensnet"
    # any policy can be the reference
    md = build_pooled(
        ["s0", "s1"], "pooled_lex", reference="lexical", tracking_uri=uri, out_dir=out
    ).read_text()
    assert f"| {TASK} | lensnet | 0.8 | 1 | 0.9 | 20 | 2 | 3 |" in md


def test_bad_pools_stop_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri, client, exp = populate(tmp_path)
    # the same seed twice: the same examples
    _log_outcomes(client, tmp_path, _eval_run(client, exp, "s0_again", 0), 0, {"lensnet": {0}})
    _eval_run(client, exp, "other_budget", 2, budget=256)
    _eval_run(client, exp, "no_samples", 3)
    out = tmp_path / "r"
    out.mkdir()
    kept = out / "pool.md"
    kept.write_text("an earlier report\n")
    for names, name, kwargs, match in (
        (["s0"], "pool", {}, "at least two experiment names"),
        (["s0", "s0"], "pool", {}, "named twice"),
        (["s0", "s1"], "s1", {}, "is one of the pooled experiments; its own report would be overwritten"),
        (["s0", "typo"], "pool", {}, "no finished runs of experiment 'typo'"),
        (["s0", "other_budget"], "pool", {}, r"allocator.budget differs \(s0: 128, other_budget: 256\)"),
        (["s0", "no_samples"], "pool", {}, "'no_samples' logged no per-example task outcomes"),
        (["s0", "s1"], "pool", {"reference": "oracle"}, "'s0' has no 'oracle' outcomes"),
        (["s0", "s0_again"], "pool", {}, "answer the same examples"),
    ):
        with pytest.raises(MCharError, match=match):
            build_pooled(names, name, tracking_uri=uri, out_dir=out, **kwargs)
    assert kept.read_text() == "an earlier report\n"
    assert not (out / "pool").exists()
    base = ["report", "--tracking-uri", uri, "--out-dir", str(out)]
    assert main([*base, "--pool", "s0", "s1", "--compare", "s0", "s1"]) == 2
    assert "--compare and --pool exclude each other" in capsys.readouterr().err
    assert main([*base, "--pool", "s0", "s1"]) == 0
    assert (out / "pooled-s0-s1.md").exists()
