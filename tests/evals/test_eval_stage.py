"""Stage ``eval`` end to end on a tiny local base: the metric contract lands in a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mchar.errors import MCharError
from tests.evals import build_tiny_base

POLICIES = "[recency,sink_recent,gists_only,similarity,random,attention,oracle,lensnet]"


def _cfg(root: Path, base: Path, *extra: str):  # noqa: ANN202
    from mchar.compose import compose_config

    return compose_config(
        [
            "stages=[eval]",
            f"run_dir={root / 'runs'}",
            f"artifacts_dir={root / 'artifacts'}",
            "model.kind=hf",
            f"model.name_or_path={base}",
            "data.max_files=12",
            "tree.block_size=8",
            "allocator.budget=32",
            "allocator.protect_recent=8",
            f"eval.policies={POLICIES}",
            "eval.documents=2",
            "eval.history_multiple=4",
            "eval.final_tokens=16",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from mchar.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("eval_stage")
    base = build_tiny_base(root / "base")
    cfg = _cfg(
        root,
        base,
        "eval.tasks=[passkey]",
        "eval.task_lengths=[256]",
        "eval.task_examples=1",
        "eval.task_policies=[recency]",
        "eval.oracle_documents=1",
        "eval.retrieval_documents=2",
    )
    return root, run_pipeline(cfg, command="eval")


def test_eval_stage_logs_the_metric_contract(stage_run: tuple[Path, object]) -> None:
    from mlflow.tracking import MlflowClient

    root, ctx = stage_run
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mchar.stage") == "eval"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert "ppl/full/nll" in metrics
    for p in ("recency", "sink_recent", "gists_only", "similarity", "random", "attention", "oracle"):
        for key in ("nll", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high"):
            assert f"ppl/{p}/{key}" in metrics, (p, key)
        for key in ("swap_rate", "budget_util", "residency"):
            assert f"focus/{p}/{key}" in metrics, (p, key)
    assert "ppl/lensnet/nll" not in metrics  # no trained LensNet: skipped, and said so
    assert 0.0 <= metrics["task/recency/passkey/256/acc"] <= 1.0
    assert "eval/mchar_passkey_256/exact_match" in metrics
    assert runs[0].data.tags["mchar.gistnet_trained"] == "false"
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval")}
    assert {"eval/results.json", "eval/focus_map.npy"} <= arts
    lm_eval_arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval/lm_eval")}
    assert "eval/lm_eval/task_samples_recency_local.jsonl" in lm_eval_arts
    # eval.log_samples: one line per task example with its outcome, without the long prompt
    stage_dir = Path(ctx.results["eval"]["results_path"]).parent
    samples = (stage_dir / "task_samples_recency_local.jsonl").read_text().splitlines()
    [sample] = [json.loads(line) for line in samples]
    assert sample["task"] == "mchar_passkey_256" and sample["doc_id"] == 0
    assert sample["exact_match"] == metrics["task/recency/passkey/256/acc"]
    assert isinstance(sample["response"], str) and sample["target"] == sample["doc"]["answer"]
    assert "needle_depth" in sample["doc"] and "context" not in sample["doc"]

    out = ctx.results["eval"]
    assert set(out["metrics"]) == set(metrics)
    res = json.loads(Path(out["results_path"]).read_text())
    assert res["policies"]["lensnet"] == {"skipped": res["policies"]["lensnet"]["skipped"]}
    rec = res["policies"]["recency"]
    assert rec["ci"][0] <= rec["delta_nll"] <= rec["ci"][1]
    # eval.oracle_documents=1: the oracle scores the first document only, against the reference on that document
    oracle = res["policies"]["oracle"]
    assert (rec["documents"], oracle["documents"], metrics["ppl/oracle/documents"]) == (2, 1, 1.0)
    full_first = res["full"]["per_document"][0]
    assert oracle["delta_nll"] == pytest.approx(oracle["per_document"][0] - full_first)
    assert (
        metrics["ppl/oracle/full_nll"] == pytest.approx(full_first) and "ppl/recency/full_nll" not in metrics
    )
    assert {"telemetry", "lod_histogram", "nll"} <= set(rec)
    # eval.retrieval_documents: a second set of documents (held-out files with episodes), scored the same way
    retrieval = res["retrieval"]
    assert (
        retrieval["documents"]["documents"] == 2 and retrieval["documents"]["document_tokens"] == 4 * 32 + 16
    )
    assert metrics["ppl_retrieval/full/nll"] == pytest.approx(retrieval["full"]["nll"])
    assert metrics["ppl_retrieval/full/nll"] != metrics["ppl/full/nll"]
    for p in ("recency", "similarity", "oracle"):
        assert metrics[f"ppl_retrieval/{p}/delta_nll"] == pytest.approx(retrieval["policies"][p]["delta_nll"])
        assert f"focus_retrieval/{p}/swap_rate" in metrics
    assert res["tasks"]["recency"]["passkey"]["256"] == metrics["task/recency/passkey/256/acc"]
    assert res["components"]["gistnet_trained"] is False
    assert res["components"]["device"] == "cpu"  # eval.device=auto follows trainer=cpu
    fmap = np.load(out["focus_map_path"])
    assert fmap.dtype == np.int8 and fmap.shape[1] == 4 * 32 + 16 and fmap.shape[0] >= 4


def test_bad_requests_fail_with_one_line_before_loading(tmp_path: Path) -> None:
    from mchar.stages.evaluate import preflight

    base = tmp_path / "no_model_needed"
    with pytest.raises(MCharError, match="eval.tasks"):
        _cfg(tmp_path, base, "eval.tasks=[nope]", "eval.task_lengths=[256]")
    with pytest.raises(MCharError, match="eval.policies"):
        _cfg(tmp_path, base, "eval.policies=[nope]")
    with pytest.raises(MCharError, match="smaller than one block"):
        _cfg(tmp_path, base, "allocator.budget=4")
    with pytest.raises(MCharError, match="eval.retrieval_documents: must be >= 0"):
        _cfg(tmp_path, base, "eval.retrieval_documents=-1")
    with pytest.raises(MCharError, match="outside its eval.final_tokens=16 scored tokens"):
        _cfg(tmp_path, base, "eval.retrieval_documents=2", "data.mix_answer_tail=16")
    with pytest.raises(MCharError, match="data.mix_tasks is empty"):
        _cfg(tmp_path, base, "eval.retrieval_documents=2", "data.mix_tasks=[]")
    # a 128 + 16 = 144-token document needs 18 LOD1 gists at depth 1 (K=8): more than a budget of 16, unless every
    # policy drops history
    small = ("allocator.budget=16", "tree.depth=1", "eval.history_tokens=128")
    with pytest.raises(MCharError, match="cannot hold a 144-token eval document at tree.depth=1"):
        preflight(_cfg(tmp_path, base, *small))
    preflight(_cfg(tmp_path, base, *small, "eval.policies=[recency]"))
    cfg = _cfg(tmp_path, base, "eval.tasks=[passkey]", "eval.task_lengths=[300]")
    with pytest.raises(MCharError, match="no passkey task YAML for length") as err:
        preflight(cfg)
    assert "\n" not in str(err.value)
    # an export whose weights are cut short stops here, before the base loads, naming the setting and the file
    from mchar.core.gistnet import make_gistnet

    export = tmp_path / "cut"
    make_gistnet("transformer", d_model=32, block_size=8, n_layers=1, n_heads=4).save_pretrained(export)
    (export / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:100])
    with pytest.raises(MCharError, match=r"^eval.gistnet_dir: .*cut/model.safetensors: unreadable") as err:
        preflight(_cfg(tmp_path, base, f"eval.gistnet_dir={export}"))
    assert "\n" not in str(err.value)


def test_history_tokens_scores_the_same_documents_at_every_budget(stage_run, tmp_path: Path) -> None:
    """``eval.history_tokens`` fixes the history, so a budget sweep compares budgets on one set of documents."""
    from mchar.pipeline import run_pipeline

    root, _ = stage_run
    results = []
    for budget in (32, 48):
        extra = (f"allocator.budget={budget}", "eval.history_tokens=128", "eval.policies=[recency]")
        out = run_pipeline(_cfg(tmp_path / str(budget), root / "base", *extra), command="eval").results[
            "eval"
        ]
        results.append(json.loads(Path(out["results_path"]).read_text()))
    assert [r["documents"]["history_tokens"] for r in results] == [128, 128]
    assert results[0]["full"]["nll"] == results[1]["full"]["nll"]  # the same documents, the same reference
    assert results[0]["policies"]["recency"]["nll"] != results[1]["policies"]["recency"]["nll"]
    with pytest.raises(MCharError, match="eval.history_tokens"):
        _cfg(tmp_path, root / "base", "eval.history_tokens=0")


def test_an_e2e_result_of_the_same_run_is_what_eval_loads(stage_run, tmp_path: Path) -> None:
    """``stages=[..., e2e, eval]``: the e2e exports win over the gistnet/lensnet stage exports of the same run."""
    from mchar.core.gistnet import make_gistnet
    from mchar.core.lensnet import LensNet
    from mchar.evals.components import components_from_run

    root, _ = stage_run
    cfg = _cfg(tmp_path, root / "base")
    dirs = {}
    for where in ("stage", "e2e"):
        make_gistnet("transformer", d_model=32, block_size=8, n_layers=1, n_heads=4).save_pretrained(
            tmp_path / where / "gistnet"
        )
        LensNet(32, width=16, n_layers=1, n_heads=4).save_pretrained(tmp_path / where / "lensnet")
        dirs[where] = tmp_path / where
    results = {
        "gistnet": {"artifact_dir": str(dirs["stage"] / "gistnet")},
        "lensnet": {"artifact_dir": str(dirs["stage"] / "lensnet")},
        "e2e": {"artifact_dir": str(dirs["e2e"]), "metrics": {}},  # a publish() summary
    }
    comp = components_from_run(cfg, results, root / "base")
    assert Path(comp.sources["gistnet"]) == dirs["e2e"] / "gistnet"
    assert Path(comp.sources["lensnet"]) == dirs["e2e"] / "lensnet"
    without = components_from_run(cfg, {k: v for k, v in results.items() if k != "e2e"}, root / "base")
    assert Path(without.sources["gistnet"]) == dirs["stage"] / "gistnet"


def test_a_lensnet_trained_over_another_gistnet_is_evaluated_over_that_gistnet(
    stage_run, tmp_path: Path
) -> None:
    """``stages=[lensnet,eval] lensnet.gistnet_dir=X``: the eval scores that LensNet over X (it used to silently
    take the untrained mean-pool GistNet); an explicit ``eval.gistnet_dir`` still wins."""
    from mchar.core.gistnet import make_gistnet
    from mchar.core.lensnet import LensNet
    from mchar.evals.components import components_from_run

    root, _ = stage_run
    cfg = _cfg(tmp_path, root / "base")
    for name in ("fixed", "explicit"):
        make_gistnet("transformer", d_model=32, block_size=8, n_layers=1, n_heads=4).save_pretrained(
            tmp_path / name
        )
    LensNet(32, width=16, n_layers=1, n_heads=4).save_pretrained(tmp_path / "lens")
    results = {"lensnet": {"artifact_dir": str(tmp_path / "lens"), "gistnet_dir": str(tmp_path / "fixed")}}
    comp = components_from_run(cfg, results, root / "base")
    assert Path(comp.sources["gistnet"]) == tmp_path / "fixed" and comp.gistnet_trained
    assert Path(comp.sources["lensnet"]) == tmp_path / "lens"
    cfg.eval.gistnet_dir = str(tmp_path / "explicit")
    assert Path(components_from_run(cfg, results, root / "base").sources["gistnet"]) == tmp_path / "explicit"


def test_an_e2e_lora_adapter_is_applied_with_its_gistnet_and_only_then(stage_run, tmp_path: Path) -> None:
    """An e2e export with LoRA: eval's base is the adapted base (the GistNet was trained for it); a GistNet given
    explicitly comes without it; an adapter without its lora.json stops with one line."""
    import shutil

    import torch

    from mchar.base.adapter import FrozenBaseLM
    from mchar.core.gistnet import make_gistnet
    from mchar.core.lensnet import LensNet
    from mchar.core.lora import add_lora, save_lora
    from mchar.evals.components import EvalError, components_from_run

    root, _ = stage_run
    cfg = _cfg(tmp_path, root / "base")
    export = tmp_path / "e2e"
    make_gistnet("transformer", d_model=32, block_size=8, n_layers=1, n_heads=4).save_pretrained(
        export / "gistnet"
    )
    LensNet(32, width=16, n_layers=1, n_heads=4).save_pretrained(export / "lensnet")
    adapted = FrozenBaseLM.from_pretrained(root / "base")
    for layer in add_lora(adapted.model, rank=2, alpha=4.0):
        torch.nn.init.normal_(layer.lora_b, std=0.5)
    save_lora(adapted.model, export, rank=2, alpha=4.0)
    shutil.copytree(export / "gistnet", tmp_path / "other")
    results = {"e2e": {"artifact_dir": str(export)}}

    ids = torch.arange(24).reshape(1, -1)
    with torch.no_grad():
        want = adapted.model(ids).logits
        comp = components_from_run(cfg, results, root / "base")
        got = comp.base.model(ids).logits
        other = components_from_run(cfg, results, root / "base", gistnet=tmp_path / "other")
        plain = other.base.model(ids).logits
    assert comp.describe()["lora"] == str(export)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3) and other.describe()["lora"] == ""  # another GistNet

    (export / "lora.json").unlink()
    with pytest.raises(EvalError, match=r"lora: .*lora\.json"):
        components_from_run(cfg, results, root / "base")


def test_plain_baselines_score_raw_readers_without_the_e2e_adapter(tmp_path: Path) -> None:
    """``eval.plain_baselines``: full context / recency / sink_recent read through the base without the adapter, the
    gist readers keep it; off, every policy reads through the adapted base."""
    import torch

    from mchar.base.adapter import FrozenBaseLM
    from mchar.core.lora import add_lora, save_lora
    from mchar.evals.components import SessionSettings, load_components
    from mchar.evals.perplexity import full_context_nll

    base_dir = build_tiny_base(tmp_path / "base")
    adapted = FrozenBaseLM.from_pretrained(base_dir)
    for layer in add_lora(adapted.model, rank=2):
        torch.nn.init.normal_(layer.lora_b, std=0.5)  # an adapter that changes the predictions
    save_lora(adapted.model, tmp_path / "e2e", rank=2, alpha=8.0)
    doc = torch.randint(0, 200, (96,), generator=torch.Generator().manual_seed(0))
    plain = full_context_nll(FrozenBaseLM.from_pretrained(base_dir), [doc], 16)

    def nll(comp, policy: str) -> list[float] | None:  # noqa: ANN001
        with comp.reading(policy):
            return full_context_nll(comp.base, [doc], 16)

    settings = dict(budget=32, block_size=8, depth=2)
    on = load_components(base_dir, SessionSettings(**settings, plain_baselines=True), lora=tmp_path / "e2e")
    off = load_components(base_dir, SessionSettings(**settings), lora=tmp_path / "e2e")
    assert nll(on, "full") == pytest.approx(plain) and nll(on, "recency") == pytest.approx(plain)
    assert nll(on, "lensnet") != pytest.approx(plain)  # a gist reader keeps the adapter
    assert nll(off, "full") == pytest.approx(nll(on, "lensnet"))
    assert on.describe()["plain_baselines"] is True and off.describe()["plain_baselines"] is False


def test_eval_split_val_scores_other_held_out_documents(
    stage_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eval.split=val``: tune a setting on the validation files, report on the test files."""
    import mchar.stages.gistnet as gistnet_stage
    from mchar.pipeline import run_pipeline

    splits: list[str] = []
    real = gistnet_stage.retrieval_windows

    def spy(*args: object, split: str = "val", **kw: object) -> object:
        splits.append(split)
        return real(*args, split=split, **kw)

    monkeypatch.setattr(gistnet_stage, "retrieval_windows", spy)
    root, ctx = stage_run
    extra = ("eval.split=val", "eval.policies=[recency]", "eval.retrieval_documents=1")
    out = run_pipeline(_cfg(tmp_path, root / "base", *extra), command="eval").results["eval"]
    val = json.loads(Path(out["results_path"]).read_text())
    test = json.loads(Path(ctx.results["eval"]["results_path"]).read_text())
    assert val["documents"]["documents"] == 2 and val["retrieval"]["documents"]["documents"] == 1
    assert val["full"]["per_document"] != test["full"]["per_document"]
    # (at this scale a retrieval document is all episode text, the same from either split: check the split asked)
    assert splits == ["val"]
    with pytest.raises(MCharError, match="eval.split: 'train' is not one of test, val"):
        _cfg(tmp_path, root / "base", "eval.split=train")
