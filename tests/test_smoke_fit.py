"""A `smoke` fit writes a real MLflow run (SQLite store in a temp dir) with the expected params and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from mchar.base.local_lm import is_built
from mchar.compose import compose_config
from mchar.pipeline import run_pipeline


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("smoke")
    cfg = compose_config(
        [
            "+experiment=smoke",
            f"run_dir={root / 'runs'}",
            f"artifacts_dir={root / 'artifacts'}",
            "stages=[base_lm]",
            "trainer.enable_progress_bar=false",
        ]
    )
    ctx = run_pipeline(cfg)
    return root, ctx


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    return client, client.search_runs([exp.experiment_id])


def test_smoke_fit_tracks_parent_and_stage_runs(smoke_run: tuple[Path, object]) -> None:
    root, ctx = smoke_run
    client, runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("mchar.role") == "parent"]
    stages = [r for r in runs if r.data.tags.get("mchar.stage") == "base_lm"]
    assert len(parents) == 1 and len(stages) == 1
    stage = stages[0]
    assert stage.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    for run in (parents[0], stage):
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["allocator.budget"] == "64"
        assert params["tree.depth"] == "2"
        assert params["tree.block_size"] == "8"
        assert len(run.data.tags["git_revision"]) >= 7
        assert run.data.tags["version.torch"]
        assert run.data.tags["host.cpu"] and int(run.data.tags["host.cpu_count"]) >= 1
        assert run.data.tags["host.accelerator"]  # "none" on a CPU-only machine
        assert run.data.tags["host.cpu_kernels"] in (
            "DEFAULT",
            "VSX",
            "ZVECTOR",
            "AVX2",
            "AVX512",
            "SVE256",
            "NEON",
        )
        assert run.data.tags["host.kernel_pins"]
        assert "config" in [a.path for a in client.list_artifacts(run.info.run_id)]
    metrics = stage.data.metrics
    assert metrics["final/val_ppl"] > 1.0
    assert {"final/task_acc/passkey", "final/task_acc/overall", "train/loss"} <= set(metrics)
    history = client.get_metric_history(stage.info.run_id, "train/loss")
    assert len(history) >= 2, "train/loss must be logged over steps"


def test_smoke_fit_saves_a_loadable_hf_base(smoke_run: tuple[Path, object]) -> None:
    import torch

    from mchar.base.adapter import FrozenBaseLM

    root, ctx = smoke_run
    model_dir = Path(ctx.results["base_lm"]["model_dir"])
    assert is_built(model_dir)
    base = FrozenBaseLM.from_pretrained(model_dir)
    assert base.tokenizer is not None
    ids = torch.tensor([base.tokenizer.encode("def f(x):\n    return x\n")])
    assert base.forward_ids(ids).shape[-1] == base.vocab_size


def test_second_fit_reuses_the_base(smoke_run: tuple[Path, object]) -> None:
    root, ctx = smoke_run
    cfg = compose_config(
        [
            "+experiment=smoke",
            f"run_dir={root / 'runs'}",
            f"artifacts_dir={root / 'artifacts'}",
            "stages=[base_lm]",
            "trainer.enable_progress_bar=false",
        ]
    )
    again = run_pipeline(cfg)
    assert again.results["base_lm"]["trained"] is False
