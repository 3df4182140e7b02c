"""Fits under trainer=ddp_cpu (2 gloo processes): one MLflow stage run and one export per stage, rank zero only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _fit(tmp: Path, *overrides: str, timeout: int = 900) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "mchar",
        "fit",
        "+experiment=smoke",
        f"run_dir={tmp / 'runs'}",
        f"artifacts_dir={tmp / 'art'}",
        "base_lm.max_steps=5",
        "base_lm.task_eval_examples=1",
        "data.max_files=20",
        "gistnet.max_steps=4",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    # its own process group: on a hang, the ranks Lightning started are killed too (they hold the output pipes)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the DDP fit did not finish in {timeout}s (hung ranks): {err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_gistnet_ddp_cpu_logs_once(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    _fit(tmp_path, "stages=[base_lm]")
    _fit(tmp_path, "stages=[gistnet]", "trainer=ddp_cpu")
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mchar.stage") == "gistnet"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "final/dnll" in runs[0].data.metrics and "final/drop_dnll" in runs[0].data.metrics
    assert (tmp_path / "art" / "gistnet" / "smoke" / "model.safetensors").exists()


@pytest.mark.slow
def test_every_fit_stage_from_scratch_under_ddp_cpu(tmp_path: Path) -> None:
    """base -> GistNet -> LensNet -> e2e in one DDP command: each stage loads the one before from disk, so every rank must
    wait for rank zero's export (a rank that ran ahead once trained a second base alone and both ranks hung)."""
    from mlflow.tracking import MlflowClient

    _fit(
        tmp_path,
        "stages=[base_lm,gistnet,lensnet,e2e]",
        "trainer=ddp_cpu",
        "lensnet.max_steps=4",
        "e2e.max_steps=4",
        "e2e.lora=true",  # alternate steps leave a group without gradients: DDP must be told
        timeout=400,
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    stages = sorted(
        r.data.tags["mchar.stage"]
        for r in client.search_runs([exp.experiment_id])
        if "mchar.stage" in r.data.tags
    )
    assert stages == ["base_lm", "e2e", "gistnet", "lensnet"]
    assert sorted(p.name for p in (tmp_path / "art" / "base_lm").iterdir()) == [
        "local_tiny"
    ]  # no build left behind
    for export in (
        "gistnet/smoke/model.safetensors",
        "lensnet/smoke/model.safetensors",
        "e2e/smoke/lora.safetensors",
    ):
        assert (tmp_path / "art" / export).exists(), export


@pytest.mark.slow
def test_ddp_validation_scores_each_window_once_with_single_process_seeds(tmp_path: Path) -> None:
    """Held-out metrics before the first step (same weights) are a single process's under DDP: 3 code batches
    split 2 + 1 between the ranks (no repeats), each seeded by its global index."""
    from mlflow.tracking import MlflowClient

    _fit(tmp_path, "stages=[base_lm]")
    common = ("stages=[gistnet]", "gistnet.val_every=2", "gistnet.val_windows=6", "data.batch_size=2")
    _fit(tmp_path, *common, "name=one")
    _fit(tmp_path, *common, "name=two", "trainer=ddp_cpu", timeout=400)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")

    def step0(name: str) -> dict[str, float]:
        (run,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}/gistnet'")
        keys = [k for k in run.data.metrics if k.startswith(("val/", "val_retrieval/"))]
        hist = {
            k: [m.value for m in client.get_metric_history(run.info.run_id, k) if m.step == 0] for k in keys
        }
        return {k: v[0] for k, v in hist.items() if v}

    one, two = step0("one"), step0("two")
    assert "val/dnll_lod1" in one and one.keys() == two.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
