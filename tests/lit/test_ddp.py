"""Fits under trainer=ddp_cpu (2 gloo processes): one MLflow stage run and one export per stage, rank zero only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _mchar_fit(tmp: Path, *overrides: str) -> list[str]:
    """The arguments after ``python -m`` (or a launcher's ``-m``) for a small smoke fit inside ``tmp``."""
    return [
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


def _run_all(tmp: Path, commands: list[list[str]], timeout: int) -> None:
    """Run the commands side by side (one per node, say) and require each to exit 0."""
    src = str(Path(__file__).resolve().parents[2] / "src")  # ahead of, not instead of, the caller's own path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # each in its own process group: on a hang, the ranks Lightning or torchrun started are killed too (they hold
    # the output pipes)
    procs = [
        subprocess.Popen(
            cmd,
            env=env,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for cmd in commands
    ]
    deadline = time.monotonic() + timeout
    errs = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            _, err = proc.communicate()
            pytest.fail(f"the distributed fit did not finish in {timeout}s (hung ranks): {err[-2000:]}")
        errs.append((proc.returncode, err))
    for code, err in errs:
        assert code == 0, err[-3000:]


def _fit(tmp: Path, *overrides: str, timeout: int = 900) -> None:
    _run_all(tmp, [[sys.executable, "-m", *_mchar_fit(tmp, *overrides)]], timeout)


def _stage_runs(tmp: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    return sorted(
        r.data.tags["mchar.stage"]
        for r in client.search_runs([exp.experiment_id])
        if "mchar.stage" in r.data.tags
    )


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

    _fit(
        tmp_path,
        "stages=[base_lm,gistnet,lensnet,e2e]",
        "trainer=ddp_cpu",
        "lensnet.max_steps=4",
        "e2e.max_steps=4",
        "e2e.lora=true",  # alternate steps leave a group without gradients: DDP must be told
        timeout=400,
    )
    assert _stage_runs(tmp_path) == ["base_lm", "e2e", "gistnet", "lensnet"]
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun(tmp_path: Path) -> None:
    """The README's multi-node launch, both "nodes" on this machine: torchrun per node, one process each, gloo. Node
    1's only process is its node's local rank 0 but global rank 1, so it must neither log to MLflow nor export,
    and it must wait for node 0's base before its GistNet stage."""
    port = _free_port()
    nodes = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            *_mchar_fit(
                tmp_path,
                "stages=[base_lm,gistnet,lensnet]",
                "trainer=ddp_cpu",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                "lensnet.max_steps=4",
            ),
        ]
        for rank in (0, 1)
    ]
    _run_all(tmp_path, nodes, timeout=400)
    assert _stage_runs(tmp_path) == ["base_lm", "gistnet", "lensnet"]
    assert sorted(p.name for p in (tmp_path / "art" / "base_lm").iterdir()) == ["local_tiny"]
    for export in ("gistnet/smoke/model.safetensors", "lensnet/smoke/model.safetensors"):
        assert (tmp_path / "art" / export).exists(), export
