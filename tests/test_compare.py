"""``report --compare``: two experiments side by side, from a real SQLite MLflow store filled by real client calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mchar.cli import main
from mchar.compare import build_comparison
from mchar.errors import MCharError

from .mlflow_runs import log_stage_run

# per experiment: budget, base perplexity, ΔNLL (recency, lensnet), LOD1 gist vs drop, Spearman, passkey@1024
EXPERIMENTS = {
    "ref": {
        "budget": 128,
        "ppl": 55.25,
        "dnll": (0.175, 0.229),
        "lod1": (0.368, 0.432),
        "rho": 0.233,
        "pk": 0.97,
    },
    "ablation": {
        "budget": 256,
        "ppl": 34.5,
        "dnll": (0.076, 0.128),
        "lod1": (0.286, 0.313),
        "rho": 0.254,
        "pk": 1.0,
    },
}


def _run(
    client: Any, exp: str, parent: str, name: str, stage: str, budget: int, metrics: dict[str, float]
) -> str:
    return log_stage_run(
        client,
        exp,
        parent,
        name=name,
        stage=stage,
        argv=f"python -m mchar fit +experiment=quickstart name={name}",
        params={"allocator.budget": budget, "tree.depth": 2, "tree.block_size": 16},
        metrics=metrics,
        finished=True,
    )


def populate(uri: str, tmp: Path) -> dict[str, str]:
    """Each experiment: a parent run with base_lm, gistnet, lensnet and eval stage runs, as the pipeline logs them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("mchar", artifact_location=(tmp / "mlartifacts").as_uri())
    evals = {}
    for name, e in EXPERIMENTS.items():
        parent = client.create_run(exp, run_name=f"fit:{name}", tags={"mchar.role": "parent"}).info.run_id
        b = e["budget"]
        _run(client, exp, parent, name, "base_lm", b, {"final/val_ppl": e["ppl"]})
        gist, drop = e["lod1"]
        _run(client, exp, parent, name, "gistnet", b, {"final/dnll_lod1": gist, "final/drop_dnll_lod1": drop})
        _run(
            client,
            exp,
            parent,
            name,
            "lensnet",
            b,
            {"final/spearman": e["rho"], "final_retrieval/spearman": 0.5},
        )
        recency, lensnet = e["dnll"]
        metrics = {"ppl/full/nll": 3.5, "task/lensnet/passkey/1024/acc": e["pk"]}
        for policy, d in (("recency", recency), ("lensnet", lensnet)):
            metrics |= {
                f"ppl/{policy}/delta_nll": d,
                f"ppl/{policy}/delta_nll_ci_low": d - 0.125,
                f"ppl/{policy}/delta_nll_ci_high": d + 0.125,
            }
        gap = recency - lensnet
        metrics |= {"ppl/recency/vs_lensnet/mean": gap, "ppl/recency/vs_lensnet/ci_low": gap - 0.0625}
        metrics |= {"ppl/recency/vs_lensnet/ci_high": gap + 0.0625}
        if name == "ref":  # only the reference logged lensnet − recency's parts
            metrics |= {
                "ppl/gap/cover/mean": 0.0625,
                "ppl/gap/focus/mean": -0.125,
                "ppl/gap/focus/ci_low": -0.25,
            }
            metrics |= {"ppl/gap/focus/ci_high": 0.0}
        if name == "ablation":  # only one experiment scored the held-out retrieval documents
            metrics |= {
                "ppl_retrieval/lensnet/delta_nll": 0.0625,
                "ppl_retrieval/recency/vs_lensnet/mean": 0.125,
            }
        evals[name] = _run(client, exp, parent, name, "eval", b, metrics)
        client.set_terminated(parent)
    # a newer sweep trial under the reference's name (sweeps over the quickstart run as name=quickstart)
    trial = client.create_run(
        exp, tags={"mchar.role": "parent", "mchar.study": "s", "mchar.trial": "0"}
    ).info.run_id
    _run(client, exp, trial, "ref", "eval", 64, {"ppl/full/nll": 9.5, "ppl/recency/delta_nll": 9.25})
    return evals


def test_two_experiments_side_by_side(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    evals = populate(uri, tmp_path)
    path = build_comparison(["ref", "ablation"], "ref_vs_ablation", tracking_uri=uri, out_dir=tmp_path / "r")
    md = path.read_text()
    assert path == tmp_path / "r" / "ref_vs_ablation.md"
    assert "| ref | 128 | 2 | 16 | 55.25 | 3.5 |" in md and "| ablation | 256 | 2 | 16 | 34.5 | 3.5 |" in md
    assert "| policy | ref | ablation |" in md
    assert "9.25" not in md and "9.5" not in md  # the sweep trial does not stand in for the experiment
    assert "| recency | 0.175 [0.05, 0.3] | 0.076 [-0.049, 0.201] |" in md
    assert "| tree_recency − recency (cover) | 0.0625 | — |" in md
    assert "| lensnet − tree_recency (focus) | -0.125 [-0.25, 0] | — |" in md
    assert "| lensnet | 0.229 [0.104, 0.354] | 0.128 [0.003, 0.253] |" in md
    assert "| recency − lensnet | -0.054 [-0.1165, 0.0085] | -0.052 [-0.1145, 0.0105] |" in md
    assert "| lensnet | passkey | 1024 | 0.97 | 1 |" in md
    assert "| gistnet | code | dnll_lod1 | 0.368 | 0.286 |" in md
    assert "| gistnet | code | drop_dnll_lod1 | 0.432 | 0.313 |" in md
    assert "| lensnet | retrieval | spearman | 0.5 | 0.5 |" in md
    assert "dnll_lod2" not in md  # a metric no experiment logged gets no row
    assert all(rid in md for rid in evals.values())
    png = tmp_path / "r" / "ref_vs_ablation" / "dnll_by_experiment.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](ref_vs_ablation/dnll_by_experiment.png)" in md
    retrieval = md[
        md.index("## ΔNLL vs full context at each column's budget on held-out retrieval documents") :
    ]
    assert "| lensnet | — | 0.0625 |" in retrieval and "| recency − lensnet | — | 0.125 |" in retrieval
    assert "](ref_vs_ablation/dnll_by_experiment_retrieval.png)" in retrieval


def test_bad_comparisons_stop_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    populate(uri, tmp_path)
    out = tmp_path / "r"
    out.mkdir()
    kept = out / "cmp.md"
    kept.write_text("an earlier comparison\n")
    for names, name, match in (
        (["ref"], "cmp", "at least two experiment names"),
        (["ref", "ref"], "cmp", "named twice"),
        (["ref", "ablation"], "ref", "is one of the compared experiments"),
        (["ref", "typo"], "cmp", "no finished runs of experiment 'typo'"),
        (["ref", "ablation"], "../cmp", "must be a plain name"),
    ):
        with pytest.raises(MCharError, match=match):
            build_comparison(names, name, tracking_uri=uri, out_dir=out)
    assert kept.read_text() == "an earlier comparison\n"
    argv = [
        "report",
        "--compare",
        "ref",
        "ablation",
        "--run-id",
        "x",
        "--tracking-uri",
        uri,
        "--out-dir",
        str(out),
    ]
    assert main(argv) == 2
    assert "--run-id and --compare exclude each other" in capsys.readouterr().err
    assert main(["report", "--compare", "ref", "ablation", "--tracking-uri", uri, "--out-dir", str(out)]) == 0
    assert (
        out / "compare-ref-ablation.md"
    ).exists()  # the default name never lands on an experiment's report


def test_task_outcomes_pair_across_experiments_on_the_same_examples(tmp_path: Path) -> None:
    """Each experiment's per-example outcomes (``eval.log_samples``) against the first's, per policy, only on the
    examples that are the same in both runs; an example whose target differs under one doc id is left out."""
    import json

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    evals = populate(uri, tmp_path)
    client = MlflowClient(uri)
    right = {"ref": {"lensnet": set(range(10)), "recency": {0}}, "ablation": {"lensnet": {0, 1, 2, 3, 9}}}
    for name, policies in right.items():
        for policy, ok in policies.items():
            rows = [
                {
                    "task": "mchar_passkey_512",
                    "doc_id": d,
                    "target": "other" if (name, d) == ("ablation", 9) else str(d),
                    "exact_match": float(d in ok),
                    "doc": {"needle_depth": 0.5},
                }
                for d in range(10)
            ]
            path = tmp_path / f"task_samples_{policy}_local.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            client.log_artifact(evals[name], str(path), "eval/lm_eval")
    md = build_comparison(["ref", "ablation"], "cmp", tracking_uri=uri, out_dir=tmp_path / "r").read_text()
    section = md[md.index("## Paired task outcomes against ref") :]
    # 9 shared examples (doc 9 differs); ref answers all 9, the ablation 4: 5 discordant, p = 2 / 2**5
    assert "| ablation | lensnet | mchar_passkey_512 | 9 | 1 | 0.4444 | 5 | 0 | 0.0625 |" in section
    assert "ablation / lensnet: 1 examples with the same doc id differ, left out" in section
    assert "| recency |" not in section  # a policy only one experiment ran has nothing to pair
