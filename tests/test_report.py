"""Reports from a real SQLite MLflow store populated with real client calls (the eval stage's data contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .mlflow_runs import log_stage_run

POLICIES = ("recency", "lensnet")
BUDGETS = (64, 128, 256)
TASKS = ("passkey", "kv_retrieval")
LENGTHS = (256, 1024)


def dnll(policy: str, budget: int) -> float:
    return round((0.9 if policy == "recency" else 0.4) * 64 / budget + 0.0123, 6)


def gap_metrics(budget: int) -> dict[str, float]:
    """``lensnet − recency``'s paired parts from real per-document NLLs: the cover costs 1/16 on every document,
    the focus wins ``budget / 1024`` back on every one."""
    from mchar.evals.perplexity import PolicyResult, metrics_from_summary, summarise

    recency = [1.0, 2.0, 3.0, 4.0]
    cover = [x + 0.0625 for x in recency]
    nll = {"recency": recency, "tree_recency": cover, "lensnet": [x - budget / 1024 for x in cover]}
    summary = summarise({p: PolicyResult(nll=v, telemetry=[]) for p, v in nll.items()}, None)
    return {k: v for k, v in metrics_from_summary(summary).items() if k.startswith("ppl/gap/")}


def _stage_run(client: Any, exp: str, parent: str, stage: str, params: dict[str, Any]) -> str:
    return log_stage_run(
        client,
        exp,
        parent,
        name="quickstart",
        stage=stage,
        argv=f"python -m mchar fit +experiment=quickstart allocator.budget={params['b']}",
        params={"allocator.budget": params["b"], "tree.depth": 2, "tree.block_size": 32},
    )


def populate(uri: str, tmp: Path) -> dict[str, Any]:
    """One pipeline (base_lm, gistnet, eval@64) and two more eval-only pipelines (eval@128, eval@256)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("mchar", artifact_location=(tmp / "mlartifacts").as_uri())
    ids: dict[str, Any] = {"eval": {}, "parents": []}
    for i, budget in enumerate(BUDGETS):
        parent = client.create_run(exp, run_name="fit:quickstart", tags={"mchar.role": "parent"}).info.run_id
        ids["parents"].append(parent)
        if i == 0:
            rid = _stage_run(client, exp, parent, "base_lm", {"b": budget})
            client.log_metric(rid, "final/val_ppl", 17.25)
            client.log_metric(rid, "final/task_acc/passkey", 0.625)
            client.set_terminated(rid)
            ids["base_lm"] = rid
            rid = _stage_run(client, exp, parent, "gistnet", {"b": budget})
            for k, v in {
                "final/delta_nll": 0.3141,
                "final/delta_nll_lod1": 0.2718,
                "final/delta_nll_lod2": 0.5772,
                "final/drop_delta_nll": 1.4142,
                "final_retrieval/delta_nll": 0.0777,
            }.items():
                client.log_metric(rid, k, v)
            for step, lod1, drop in ((0, 0.9, 0.6), (50, 0.5, 0.6), (100, 0.27, 0.6)):  # a validation trend
                client.log_metric(rid, "val/dnll_lod1", lod1, step=step)
                client.log_metric(rid, "val/drop_dnll_lod1", drop, step=step)
            client.log_metric(rid, "val_retrieval/dnll_lod1", 0.4, step=100)  # validated once: no trend
            client.set_tag(rid, "mchar.val_windows", "11")
            client.set_tag(rid, "mchar.val_retrieval_windows", "12")
            client.set_terminated(rid)
            ids["gistnet"] = rid
        rid = _stage_run(client, exp, parent, "eval", {"b": budget})
        results: dict[str, Any] = {"policies": {}, "full": {"nll": 2.5}, "tasks": {}}
        client.log_metric(rid, "ppl/full/nll", 2.5)
        for j, policy in enumerate(POLICIES):
            d = dnll(policy, budget)
            metrics = {
                f"ppl/{policy}/nll": 2.5 + d,
                f"ppl/{policy}/delta_nll": d,
                f"ppl/{policy}/delta_nll_ci_low": d - 0.01,
                f"ppl/{policy}/delta_nll_ci_high": d + 0.01,
                f"focus/{policy}/swap_rate": 0.11 * (j + 1),
                f"focus/{policy}/budget_util": 0.97 - 0.01 * j,
                f"focus/{policy}/residency": 0.5 + 0.1 * j,
                f"focus/{policy}/raw_tokens": budget - 8.0 * j,
                f"focus/{policy}/gist_slots": 4.0 * j,
                f"focus/{policy}/scored_raw_tokens": budget - 16.0 * j,
                f"focus/{policy}/scored_gist_slots": 5.0 * j,
                f"focus/{policy}/lod_share/0": 0.25,
                f"focus/{policy}/lod_share/{'dropped' if policy == 'recency' else '2'}": 0.75,
            }
            for t, task in enumerate(TASKS):
                for n, length in enumerate(LENGTHS):
                    metrics[f"task/{policy}/{task}/{length}/acc"] = 0.875 - 0.25 * n - 0.125 * t - 0.0625 * j
            if policy != "lensnet":  # the paired difference to lensnet, as metrics_from_summary names it
                gap = d - dnll("lensnet", budget)
                for key, v in {
                    "mean": gap,
                    "ci_low": gap - 0.002,
                    "ci_high": gap + 0.002,
                    "wins": 9,
                    "documents": 10,
                }.items():
                    metrics[f"ppl/{policy}/vs_lensnet/{key}"] = v
            # the held-out retrieval documents (eval.retrieval_documents): the same contract under ppl_retrieval/
            metrics[f"ppl_retrieval/{policy}/nll"] = 3.0 + d / 2
            metrics[f"ppl_retrieval/{policy}/delta_nll"] = d / 2
            if policy != "lensnet":
                metrics[f"ppl_retrieval/{policy}/vs_lensnet/mean"] = 0.0625
                metrics[f"ppl_retrieval/{policy}/vs_lensnet/wins"] = 7
                metrics[f"ppl_retrieval/{policy}/vs_lensnet/documents"] = 8
            for k, v in metrics.items():
                client.log_metric(rid, k, v)
            results["policies"][policy] = {"nll": 2.5 + d, "delta_nll": d, "ci": [d - 0.01, d + 0.01]}
        if budget != BUDGETS[0]:  # the gap's parts, as the eval stage names them (the budget-64 run has none)
            for k, v in gap_metrics(budget).items():
                client.log_metric(rid, k, v)
        client.log_text(rid, json.dumps(results), "eval/results.json")
        focus = np.full((6, 12), -1, dtype=np.int64)
        for t in range(6):
            focus[t, : 2 * (t + 1)] = np.arange(2 * (t + 1)) % 3
        np.save(tmp / "focus_map.npy", focus)
        client.log_artifact(rid, str(tmp / "focus_map.npy"), "eval")
        if (
            i == len(BUDGETS) - 1
        ):  # eval.log_samples: per-example outcomes of the newest run, lensnet vs recency
            for policy, right in (("lensnet", set(range(9))), ("recency", {0, 1, 9})):
                path = tmp / f"task_samples_{policy}_local.jsonl"
                rows = [
                    {"task": "mchar_passkey_512", "doc_id": d, "exact_match": float(d in right)}
                    for d in range(10)
                ]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                client.log_artifact(rid, str(path), "eval/lm_eval")
        client.set_terminated(rid)
        client.set_terminated(parent)
        ids["eval"][budget] = rid
    return ids


def test_report_from_real_store(tmp_path: Path) -> None:
    from mchar.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = populate(uri, tmp_path)
    path = build_report(name="quickstart", experiment="mchar", tracking_uri=uri, out_dir=tmp_path / "reports")
    md = path.read_text()
    assert path == tmp_path / "reports" / "quickstart.md"
    for name in ("dnll_vs_budget", "task_accuracy", "telemetry", "focus_map"):
        png = tmp_path / "reports" / "quickstart" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"](quickstart/{name}.png)" in md
    for policy in POLICIES:  # every ΔNLL of every budget, as stored
        for budget in BUDGETS:
            assert (
                f"| {budget} | 2 | 32 | {policy} | {2.5 + dnll(policy, budget):.4g} | {dnll(policy, budget):.4g} |"
                in md
            )
    assert "17.25" in md and "0.625" in md and "0.3141" in md and "1.414" in md  # headline metrics
    assert "**lensnet**: _not run_" in md
    assert "| final/delta_nll | 0.3141 | 0.0777 |" in md  # both validation sets side by side
    assert "| metric | held-out code windows (11) | held-out retrieval windows (12) |" in md  # what each read
    assert "| final/drop_delta_nll | 1.414 | — |" in md
    assert ids["base_lm"] in md and ids["gistnet"] in md and all(r in md for r in ids["eval"].values())
    assert "python -m mchar fit +experiment=quickstart allocator.budget=128" in md
    # telemetry from the newest budget's eval run; a LOD share a policy never held is "—"
    assert (
        "| policy | swap rate | budget util | residency | raw tokens | gist slots | raw tokens (scored) "
        "| gist slots (scored) | LOD0 | LOD2 | dropped |" in md
    )
    assert "| lensnet | 0.22 | 0.96 | 0.6 | 248 | 4 | 240 | 5 | 0.25 | 0.75 | — |" in md
    assert "| recency | 0.11 | 0.97 | 0.5 | 256 | 0 | 256 | 0 | 0.25 | — | 0.75 |" in md
    # several (budget, depth) points: the task and telemetry tables cover every one, with the point's columns
    assert (
        "Every (budget, depth) of 3 eval runs; the plot shows budget 256, depth 2 (the newest run's)." in md
    )
    assert "\n| budget | depth | policy | task | 256 | 1024 |" in md
    assert "\n| budget | depth | policy | swap rate | budget util |" in md
    for budget in BUDGETS:
        assert f"\n| {budget} | 2 | lensnet | passkey | 0.8125 | 0.5625 |" in md
        assert f"\n| {budget} | 2 | lensnet | 0.22 | 0.96 | 0.6 | {budget - 8} | 4 |" in md
    assert "### Paired: NLL(policy) − NLL(lensnet) per document" in md
    assert "| recency | 0.125 | [0.123, 0.127] | 9/10 |" in md  # newest eval run (budget 256)
    # lensnet's gap to recency in its two parts, at every (budget, depth) whose run logged them
    gap = md[
        md.index("### Where lensnet's gap to recency comes from") : md.index("## Perplexity at budget on")
    ]
    assert "\n| 256 | 2 | cover | NLL(tree_recency) − NLL(recency) | 0.0625 | [0.0625, 0.0625] | 4/4 |" in gap
    assert "\n| 256 | 2 | focus | NLL(lensnet) − NLL(tree_recency) | -0.25 | [-0.25, -0.25] | 0/4 |" in gap
    assert "\n| 128 | 2 | focus | NLL(lensnet) − NLL(tree_recency) | -0.125 |" in gap
    assert "\n| 64 |" not in gap and md.count("### Where lensnet's gap") == 1  # no retrieval parts logged
    assert "cells per LOD" in md and "-1: 30" in md
    # paired task outcomes on the same examples: 7 only lensnet answers, 1 only recency; exact McNemar 2 * 9 / 256
    assert "### Paired task outcomes: lensnet vs each policy on the same examples" in md
    assert "| recency | mchar_passkey_512 | 10 | 0.9 | 0.3 | 7 | 1 | 0.07031 |" in md
    # the retrieval documents get their own ΔNLL table, plot and paired table, after the code documents'
    retrieval = md[md.index("## Perplexity at budget on held-out retrieval documents") :]
    assert md.index("## Perplexity at budget (ΔNLL") < md.index(
        "## Perplexity at budget on held-out retrieval"
    )
    for budget in BUDGETS:
        d = dnll("recency", budget)
        assert f"| {budget} | 2 | 32 | recency | {3.0 + d / 2:.4g} | {d / 2:.4g} |" in retrieval
    assert "](quickstart/dnll_vs_budget_retrieval.png)" in retrieval
    assert "| recency | 0.0625 | [—, —] | 7/8 |" in retrieval.split("## Task accuracy")[0]
    trend = md[md.index("## Training trends") :]
    assert "**gistnet**, held-out code windows" in trend and "| step | dnll_lod1 | drop_dnll_lod1 |" in trend
    assert "| 0 | 0.9 | 0.6 |" in trend and "| 50 | 0.5 | 0.6 |" in trend and "| 100 | 0.27 | 0.6 |" in trend
    assert "held-out retrieval windows" not in trend.split("##")[1]  # one point is not a trend
    png = tmp_path / "reports" / "quickstart" / "trend_gistnet_val.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](quickstart/trend_gistnet_val.png)" in md


def test_report_scoped_to_one_run_and_missing_sections(tmp_path: Path) -> None:
    from mchar.errors import MCharError
    from mchar.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = populate(uri, tmp_path)
    path = build_report(
        name="one",
        experiment="mchar",
        tracking_uri=uri,
        run_id=ids["parents"][1],
        out_dir=tmp_path / "reports",
    )
    md = path.read_text()
    assert ids["eval"][128] in md and ids["eval"][64] not in md and ids["eval"][256] not in md
    # one (budget, depth): named once above the tables, no point columns
    assert "\n| policy | swap rate | budget util |" in md and "\n| policy | task | 256 | 1024 |" in md
    assert "Budget 128, depth 2; runs" in md and "Every (budget, depth)" not in md
    assert "**base_lm**: _not run_" in md and "**gistnet**: _not run_" in md
    kept = tmp_path / "reports" / "nothing.md"
    kept.write_text("an earlier report\n")
    with pytest.raises(
        MCharError, match="no finished runs of experiment 'nothing' and no sweep study 'nothing'"
    ):
        build_report(name="nothing", experiment="mchar", tracking_uri=uri, out_dir=tmp_path / "reports")
    assert (
        kept.read_text() == "an earlier report\n"
    )  # a mistyped name never overwrites a report with an empty one
    with pytest.raises(MCharError, match="no tracking store"):
        build_report(name="x", tracking_uri=f"sqlite:///{tmp_path}/absent.db", out_dir=tmp_path / "r")
    with pytest.raises(MCharError, match="not found"):
        build_report(name="x", tracking_uri=uri, run_id="0" * 32, out_dir=tmp_path / "r")


def test_report_stage_logs_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``stages=[eval,report]`` through the real pipeline, with a stand-in eval stage that logs the contract."""
    from mlflow.tracking import MlflowClient

    import mchar.pipeline
    from mchar.compose import compose_config
    from mchar.pipeline import run_pipeline

    def fake_eval(ctx: Any, run_id: str | None) -> dict[str, Any]:
        metrics = {
            "ppl/full/nll": 3.0,
            "ppl/recency/nll": 3.25,
            "ppl/recency/delta_nll": 0.25,
            "focus/recency/swap_rate": 0.5,
            "focus/recency/budget_util": 1.0,
        }
        ctx.tracker.log_metrics(run_id, metrics)
        return {"metrics": metrics}

    monkeypatch.setattr(mchar.pipeline, "_stage_fn", lambda s: {"eval": fake_eval}.get(s) or _real(s))
    cfg = compose_config(
        [
            "+experiment=smoke",
            "stages=[eval,report]",
            f"run_dir={tmp_path}/runs",
            f"artifacts_dir={tmp_path}/art",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    ctx = run_pipeline(cfg, command="fit")
    report = Path(ctx.results["report"]["report"])
    assert report == tmp_path / "reports" / "smoke.md"
    assert "| 64 | 2 | 8 | recency | 3.25 | 0.25 |" in report.read_text()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    stage = client.search_runs(
        [client.get_experiment_by_name("mchar").experiment_id], "tags.`mchar.stage` = 'report'"
    )[0]
    logged = {a.path for a in client.list_artifacts(stage.info.run_id, "report")}
    assert "report/smoke.md" in logged and "report/smoke" in logged
    assert {a.path for a in client.list_artifacts(stage.info.run_id, "report/smoke")} >= {
        "report/smoke/dnll_vs_budget.png",
        "report/smoke/telemetry.png",
    }


def _real(stage: str) -> Any:
    import importlib

    import mchar.pipeline

    module, _, fn = mchar.pipeline.STAGE_MODULES[stage].partition(":")
    return getattr(importlib.import_module(module), fn)


def _study_store(tmp_path: Path, name: str, params: dict[str, str]) -> tuple[Any, str, str, str]:
    """A real SQLite MLflow store holding one study run (``mchar.role=study``) with ``params``:
    ``(client, experiment id, study run id, tracking uri)``."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("mchar", artifact_location=(tmp_path / "mlartifacts").as_uri())
    tags = {"mchar.role": "study", "mchar.study": name}
    sid = client.create_run(exp, run_name=f"study:{name}", tags=tags).info.run_id
    for k, v in params.items():
        client.log_param(sid, k, v)
    return client, exp, sid, uri


def test_a_sweep_table_shows_each_trials_task_accuracy(tmp_path: Path) -> None:
    """A sweep over a setting that is not budget/depth/policy: each trial's task accuracies (logged by its eval stage,
    a child of the trial run) sit in the sweep table next to the objective."""
    from mchar.report import build_report

    client, exp, sid, uri = _study_store(
        tmp_path, "s", {"search_space": "lensnet.similarity_prior", "metric": "ppl/lensnet/delta_nll"}
    )
    for trial, (prior, acc) in enumerate(((0.0, 0.5625), (4.0, 0.9375))):
        tags = {"mlflow.parentRunId": sid, "mchar.trial": str(trial), "optuna.value": str(0.17 + trial / 10)}
        tid = client.create_run(exp, run_name=f"s/trial-{trial}", tags=tags).info.run_id
        client.log_param(tid, "lensnet.similarity_prior", str(prior))
        tags = {"mlflow.parentRunId": tid, "mchar.stage": "eval", "mchar.role": "stage"}
        eid = client.create_run(exp, run_name="eval", tags=tags).info.run_id
        client.log_metric(eid, "task/lensnet/passkey/1024/acc", acc)
        client.log_metric(eid, "task/lensnet/passkey/512/acc", 1.0)
    md = build_report(name="s", tracking_uri=uri, run_id=sid, out_dir=tmp_path / "r").read_text()
    assert (
        "| trial | state | lensnet.similarity_prior | value | lensnet/passkey/512 | lensnet/passkey/1024 | run |"
        in md
    )
    assert (
        "| 0 | RUNNING | 0.0 | 0.17 | 1 | 0.5625 |" in md
        and "| 1 | RUNNING | 4.0 | 0.27 | 1 | 0.9375 |" in md
    )
    assert (
        "## Perplexity at budget (ΔNLL" in md and "retrieval documents" not in md
    )  # no such set: no section
    # without --run-id, a sweep's name finds its newest study run: the same report
    by_name = build_report(name="s", tracking_uri=uri, out_dir=tmp_path / "r2").read_text()
    assert f"scope: run `{sid}` and its descendants" in by_name
    assert by_name.split("\n", 3)[3] == md.split("\n", 3)[3]  # all but the "Generated ... by" line


def test_a_sweep_over_another_setting_shows_every_trial_in_the_policy_sections(tmp_path: Path) -> None:
    """A sweep over a seed (not budget/depth/policy): the perplexity, paired, task and telemetry sections show each
    trial's numbers as their own labelled rows; before, the newest trial's hid the others under the policy name."""
    from mchar.report import build_report

    client, exp, sid, uri = _study_store(tmp_path, "s", {"search_space": "seed,allocator.policy"})
    for trial, (seed, lens) in enumerate(((0, 0.125), (1, 0.25))):
        tid = client.create_run(
            exp, run_name=f"s/trial-{trial}", tags={"mlflow.parentRunId": sid, "mchar.trial": str(trial)}
        ).info.run_id
        for k, v in {"seed": seed, "allocator.policy": "lensnet"}.items():
            client.log_param(tid, k, str(v))
        tags = {"mlflow.parentRunId": tid, "mchar.stage": "eval", "mchar.role": "stage"}
        eid = client.create_run(exp, run_name="eval", tags=tags).info.run_id
        for k, v in {"allocator.budget": 128, "tree.depth": 2, "tree.block_size": 16}.items():
            client.log_param(eid, k, str(v))
        for k, v in {
            "ppl/lensnet/delta_nll": lens,
            "ppl/lensnet/nll": 3 + lens,
            "ppl/lensnet/delta_nll_ci_low": lens - 0.0625,
            "ppl/lensnet/documents": 40,
            "ppl/recency/delta_nll": 0.5,
            "ppl/recency/vs_lensnet/mean": 0.5 - lens,
            "task/lensnet/passkey/1024/acc": 1 - lens,
            "focus/lensnet/swap_rate": lens / 2,
            "ppl/gap/focus/mean": lens / 4,
            "ppl/gap/focus/wins": 3,
            "ppl/gap/focus/documents": 40,
        }.items():
            client.log_metric(eid, k, v)
        client.set_terminated(eid)
    md = build_report(name="s", tracking_uri=uri, run_id=sid, out_dir=tmp_path / "r").read_text()
    for seed, lens in ((0, 0.125), (1, 0.25)):  # each trial's paired gap part, labelled like its other rows
        assert (
            f"| 128 | 2 | focus [seed={seed}] | NLL(lensnet) − NLL(tree_recency) | {lens / 4:.4g} | [—, —] | 3/40 |"
            in md
        )
    perplexity = md.split("## Perplexity at budget")[1].split("### Paired")[0]
    for seed, lens in ((0, 0.125), (1, 0.25)):
        assert (
            f"| 128 | 2 | 16 | lensnet [seed={seed}] | {3 + lens:.4g} | {lens:.4g} | [{lens - 0.0625:.4g}, —]"
            in perplexity
        )
        row = next(line for line in perplexity.splitlines() if f"lensnet [seed={seed}]" in line)
        assert "| 40 |" in row  # the documents column: read with the policy's own name, not the label
        assert f"| 128 | 2 | 16 | recency [seed={seed}] | — | 0.5 |" in perplexity
        assert f"| recency [seed={seed}] | {0.5 - lens:.4g} |" in md
        assert f"| lensnet [seed={seed}] | passkey | {1 - lens:.4g} |" in md
        assert f"| lensnet [seed={seed}] | {lens / 2:.4g} |" in md
    assert "| 128 | 2 | 16 | lensnet | " not in md  # no unlabelled row standing for one of the trials


def test_a_policy_sweep_splits_lensnets_gap_from_its_trials(tmp_path: Path) -> None:
    """A budget × policy sweep scores one policy per trial, so no run logs the paired parts of lensnet − recency;
    the report takes each part as the difference of two trials' ΔNLLs on the same documents (the paired mean),
    without an interval, and leaves out a budget whose trials scored different documents."""
    from mchar.report import build_report

    client, exp, sid, uri = _study_store(
        tmp_path, "bd", {"search_space": "allocator.budget,allocator.policy"}
    )
    dnll = {"recency": 0.1875, "tree_recency": 0.25, "lensnet": 0.3125}
    trials = [(128, p, d, 40) for p, d in dnll.items()] + [
        (256, "recency", 0.0, 40),
        (256, "tree_recency", 0.5, 39),
    ]
    for trial, (budget, policy, d, documents) in enumerate(trials):
        tid = client.create_run(
            exp, run_name=f"bd/trial-{trial}", tags={"mlflow.parentRunId": sid, "mchar.trial": str(trial)}
        ).info.run_id
        for k, v in {"allocator.budget": budget, "allocator.policy": policy}.items():
            client.log_param(tid, k, str(v))
        tags = {"mlflow.parentRunId": tid, "mchar.stage": "eval", "mchar.role": "stage"}
        eid = client.create_run(exp, run_name="eval", tags=tags).info.run_id
        for k, v in {"allocator.budget": budget, "tree.depth": 2, "tree.block_size": 16}.items():
            client.log_param(eid, k, str(v))
        metrics = {f"ppl/{policy}/delta_nll": d, f"ppl/{policy}/documents": documents, "ppl/full/nll": 3.5}
        for k, v in metrics.items():
            client.log_metric(eid, k, v)
        client.set_terminated(eid)
    md = build_report(name="bd", tracking_uri=uri, run_id=sid, out_dir=tmp_path / "r").read_text()
    gap = md[md.index("### Where lensnet's gap to recency comes from") :].split("\n## ")[0]
    assert "| 128 | 2 | cover | NLL(tree_recency) − NLL(recency) | 0.0625 | — | — |" in gap
    assert "| 128 | 2 | focus | NLL(lensnet) − NLL(tree_recency) | 0.0625 | — | — |" in gap
    assert "| 256 |" not in gap  # 39 documents against 40: not provably the same documents


def test_a_gistnet_sweep_table_shows_each_trials_held_out_gist_numbers(tmp_path: Path) -> None:
    """Whatever the objective, a trial's GistNet held-out numbers (gists vs dropping, in a session's cover) are in
    the sweep table, so a search over GistNet settings can be read against the issue's targets."""
    from mchar.report import build_report

    client, exp, sid, uri = _study_store(tmp_path, "g", {"search_space": "gistnet.lr"})
    for trial, lod1 in enumerate((0.375, 0.25)):
        tags = {"mlflow.parentRunId": sid, "mchar.trial": str(trial), "optuna.value": "0.2"}
        tid = client.create_run(exp, run_name=f"g/trial-{trial}", tags=tags).info.run_id
        client.log_param(tid, "gistnet.lr", str(10.0 ** -(trial + 3) * (1.0 + 1 / 3)))
        tags = {"mlflow.parentRunId": tid, "mchar.stage": "gistnet", "mchar.role": "stage"}
        gid = client.create_run(exp, run_name="gistnet", tags=tags).info.run_id
        for k, v in {
            "final/dnll_lod1": lod1,
            "final/drop_dnll_lod1": 0.5,
            "final/dnll_session": 0.0625,
        }.items():
            client.log_metric(gid, k, v)
    md = build_report(name="g", tracking_uri=uri, run_id=sid, out_dir=tmp_path / "r").read_text()
    assert "| trial | state | gistnet.lr | value | dnll_lod1 | drop_dnll_lod1 | dnll_session | run |" in md
    # sampled floats at 4 significant digits (the store holds 0.0013333333333333333)
    assert "| 0 | RUNNING | 0.001333 | 0.2 | 0.375 | 0.5 | 0.0625 |" in md
    assert "| 1 | RUNNING | 0.0001333 | 0.2 | 0.25 | 0.5 | 0.0625 |" in md


def test_sweep_trials_under_an_experiments_name_stay_out_of_its_report(tmp_path: Path) -> None:
    """A budget sweep over the quickstart runs its trials as ``name=quickstart``: the experiment's report keeps to its
    own runs (the newest trial must not stand in for it); a name that only sweep trials used still reports them."""
    from mlflow.tracking import MlflowClient

    from mchar.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = populate(uri, tmp_path)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mchar").experiment_id
    study = client.create_run(exp, run_name="study:bd", tags={"mchar.role": "study", "mchar.study": "bd"})
    trials = {}
    for name in ("quickstart", "bd_t1"):
        trial = client.create_run(
            exp,
            run_name=f"bd/trial-{name}",
            tags={"mlflow.parentRunId": study.info.run_id, "mchar.study": "bd", "mchar.trial": "1"},
        ).info.run_id
        trials[name] = log_stage_run(
            client,
            exp,
            trial,
            name=name,
            stage="eval",
            argv="python -m mchar sweep sweeps/bd.yaml",
            params={"allocator.budget": 512, "tree.depth": 2, "tree.block_size": 32},
            metrics={"ppl/recency/delta_nll": 0.0321, "ppl/recency/nll": 2.5321, "ppl/full/nll": 2.5},
            finished=True,
        )
    md = build_report(
        name="quickstart", experiment="mchar", tracking_uri=uri, out_dir=tmp_path / "r"
    ).read_text()
    assert trials["quickstart"] not in md and "| 512 |" not in md
    assert all(r in md for r in ids["eval"].values())
    md = build_report(name="bd_t1", experiment="mchar", tracking_uri=uri, out_dir=tmp_path / "r").read_text()
    assert trials["bd_t1"] in md and "| 512 | 2 | 32 | recency |" in md


def test_sweep_side_columns_name_their_validation_set() -> None:
    from mchar.report import side_label

    assert side_label("final/spearman") == "spearman"
    assert side_label("final_retrieval/spearman_expected") == "spearman_expected (retrieval)"
