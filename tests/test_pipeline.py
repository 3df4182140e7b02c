"""The pipeline checks every stage's inputs before the first stage runs: a bad path or task given for a late stage
stops in one line, before the base LM trains and before any MLflow run or run folder exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["eval.lensnet_dir={tmp}/missing"], "eval.lensnet_dir: '{tmp}/missing' is not an exported LensNet"),
        (["eval.gistnet_dir={tmp}"], "eval.gistnet_dir: '{tmp}' is not an exported GistNet"),
        (
            ["stages=[base_lm,lensnet]", "lensnet.gistnet_dir={tmp}/none"],
            "lensnet.gistnet_dir: no exported GistNet",
        ),
        (["stages=[base_lm,e2e]", "e2e.init_from=nobody"], "e2e.init_from: no GistNet export"),
        (
            ["eval.tasks=[passkey]", "eval.task_lengths=[777]"],
            "eval.task_lengths: no passkey task YAML for length(s) [777]",
        ),
        pytest.param(
            ["eval.device=cuda:0"],
            "eval.device=cuda:0: cuda:0 is not on this machine (0 CUDA devices)",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        (["trainer.strategy=dpp"], "trainer.strategy: 'dpp' is not one of auto, ddp, "),
        (["trainer.accelerator=cpus"], "trainer.accelerator: 'cpus' is not one of auto, gpu, cpu"),
        pytest.param(
            ["trainer=ddp"],
            "trainer.accelerator=gpu: no CUDA device on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_a_late_stages_bad_input_stops_before_the_first_stage(
    overrides: list[str], needle: str, tmp_path: Path
) -> None:
    runs, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    args = [
        "fit",
        "+experiment=smoke",  # stages base_lm, gistnet, lensnet, eval, ...: the base LM would train first
        f"run_dir={runs}",
        f"artifacts_dir={artifacts}",
        *(o.format(tmp=tmp_path) for o in overrides),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "mchar", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mchar: error: " + needle.format(tmp=tmp_path))
    assert not runs.exists() and not artifacts.exists()  # no run opened, nothing trained or cached


def test_only_global_rank_zero_runs_the_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP every rank re-runs the pipeline; the stages without a fit (eval, report) run on rank 0 only."""
    import lightning  # noqa: F401  (imported before LOCAL_RANK is set: it reads its rank once, at import)

    import mchar.pipeline
    from mchar.compose import compose_config

    calls: list[str] = []
    monkeypatch.setitem(mchar.pipeline.STAGE_MODULES, "eval", "tests.test_pipeline:recording_stage")
    monkeypatch.setattr(mchar.pipeline, "preflight", lambda cfg: None)
    monkeypatch.setattr("tests.test_pipeline.CALLS", calls, raising=False)
    cfg = compose_config(
        [
            "+experiment=smoke",
            "stages=[eval]",
            f"run_dir={tmp_path / 'runs'}",
            f"artifacts_dir={tmp_path / 'a'}",
        ]
    )
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = mchar.pipeline.run_pipeline(cfg)
    assert calls == [] and ctx.results["eval"] == {"skipped": "not global rank 0"}
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert mchar.pipeline.run_pipeline(cfg).results["eval"] == {"ran": True} and calls == ["eval"]


CALLS: list[str] = []


def recording_stage(ctx: object, run_id: str | None) -> dict[str, bool]:
    CALLS.append("eval")
    return {"ran": True}


def failing_stage(ctx: object, run_id: str | None) -> None:
    raise CALLS_RAISE[0]


CALLS_RAISE: list[BaseException] = []


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (RuntimeError("boom\nsecond line"), "FAILED", "RuntimeError: boom"),
        (KeyboardInterrupt(), "KILLED", None),
    ],
)
def test_a_stopped_run_says_how_it_ended(
    error: BaseException, status: str, tag: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that raises ends its run and the parent FAILED with the error's first line as ``mchar.error``; an
    interrupt ends them KILLED."""
    from mlflow.tracking import MlflowClient

    import mchar.pipeline
    from mchar.compose import compose_config

    monkeypatch.setitem(mchar.pipeline.STAGE_MODULES, "eval", "tests.test_pipeline:failing_stage")
    monkeypatch.setattr(mchar.pipeline, "preflight", lambda cfg: None)
    monkeypatch.setattr("tests.test_pipeline.CALLS_RAISE", [error])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(
        ["+experiment=smoke", "stages=[eval]", f"run_dir={tmp_path / 'runs'}", f"logger.tracking_uri={store}"]
    )
    with pytest.raises(type(error)):
        mchar.pipeline.run_pipeline(cfg)
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("mchar").experiment_id])
    assert sorted(r.info.status for r in runs) == [status, status]
    stage = next(r for r in runs if r.data.tags.get("mchar.stage") == "eval")
    assert stage.data.tags.get("mchar.error") == tag
