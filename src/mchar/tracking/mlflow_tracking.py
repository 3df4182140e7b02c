"""One MLflow parent run per command, a nested run per stage; every run carries the resolved config.

Only global rank zero talks to MLflow. Lightning re-launches the command for extra DDP ranks; they find the
parent run id in the environment (set by rank zero before the Trainer spawns them) and stay silent.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from mchar.compose import flatten, to_yaml
from mchar.config import RootConfig
from mchar.errors import first_line
from mchar.host import host_info

PARENT_ENV = "MCHAR_PARENT_RUN_ID"
TRACKED_PACKAGES = (
    "mchar",
    "torch",
    "lightning",
    "transformers",
    "datasets",
    "torchmetrics",
    "hydra-core",
    "optuna",
    "mlflow",
    "lm-eval",
    "tokenizers",
)


def is_global_zero() -> bool:
    return int(
        os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0")))
    ) == 0 and os.environ.get("NODE_RANK", "0") in ("0", "")


def tracking_uri(cfg: RootConfig) -> str:
    """Config wins, then $MLFLOW_TRACKING_URI, then an SQLite store inside the run directory."""
    if cfg.logger.tracking_uri:
        return cfg.logger.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return f"{rev}{'-dirty' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class Tracker:
    """Owns the MLflow client for one command; a no-op on non-zero ranks."""

    def __init__(self, cfg: RootConfig, command: str, parent_tags: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.command = command
        # Extra tags for the parent run, e.g. ``mlflow.parentRunId`` to nest a sweep trial under its study run.
        self.parent_tags = dict(parent_tags or {})
        self.active = is_global_zero()
        self.uri = tracking_uri(cfg)
        self.parent_id: str | None = os.environ.get(PARENT_ENV)
        self._client: Any = None
        self.experiment_id: str | None = None
        if self.active:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
            exp = self._client.get_experiment_by_name(cfg.logger.experiment_name)
            if exp is None:
                artifacts = None
                if self.uri.startswith("sqlite:///"):
                    artifacts = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
                self.experiment_id = self._client.create_experiment(
                    cfg.logger.experiment_name, artifact_location=artifacts
                )
            else:
                self.experiment_id = exp.experiment_id

    @property
    def client(self) -> Any:
        return self._client

    def _describe(self, run_id: str, cfg: RootConfig) -> None:
        params = flatten(cfg)
        items = list(params.items())
        from mlflow.entities import Param, RunTag

        for i in range(0, len(items), 100):
            self._client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])
        tags = {
            "git_revision": git_revision(),
            "command": self.command,
            "argv": " ".join(sys.argv)[:5000],
            **{f"version.{k}": v for k, v in package_versions().items()},
            **{f"host.{k}": v for k, v in host_info().items()},
        }
        self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._client.log_text(run_id, to_yaml(cfg), "config/resolved.yaml")
        self._client.log_dict(run_id, package_versions(), "config/versions.json")

    @contextmanager
    def parent(self) -> Iterator[str | None]:
        """The command's top run; re-entered (not duplicated) by relaunched DDP ranks."""
        if not self.active:
            yield self.parent_id
            return
        name = self.cfg.logger.run_name or f"{self.command}:{self.cfg.name}"
        run = self._client.create_run(
            self.experiment_id, run_name=name, tags={"mchar.role": "parent", **self.parent_tags}
        )
        self.parent_id = run.info.run_id
        os.environ[PARENT_ENV] = self.parent_id
        self._describe(self.parent_id, self.cfg)
        try:
            with self._terminated(self.parent_id):
                yield self.parent_id
        finally:
            os.environ.pop(PARENT_ENV, None)

    @contextmanager
    def _terminated(self, run_id: str) -> Iterator[None]:
        """End ``run_id`` as FINISHED, KILLED (Ctrl-C, SIGTERM via KeyboardInterrupt/SystemExit) or FAILED, with
        the error's first line as the ``mchar.error`` tag, so the UI says why a run stopped."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except BaseException as err:
            self._client.set_tag(run_id, "mchar.error", first_line(err, typed=True)[:500])
            raise
        finally:
            self._client.set_terminated(run_id, status=status)

    @contextmanager
    def stage(self, name: str, cfg: RootConfig | None = None) -> Iterator[str | None]:
        """A nested run for one stage (base_lm, gistnet, ...)."""
        if not self.active:
            yield None
            return
        tags = {"mlflow.parentRunId": self.parent_id or "", "mchar.stage": name, "mchar.role": "stage"}
        run = self._client.create_run(self.experiment_id, run_name=f"{self.cfg.name}/{name}", tags=tags)
        run_id = run.info.run_id
        self._describe(run_id, cfg or self.cfg)
        with self._terminated(run_id):
            yield run_id

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active or run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self._client.log_batch(run_id, metrics=batch[i : i + 500])

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and run_id is not None:
            self._client.log_artifact(run_id, str(path), artifact_path)

    def log_json(self, run_id: str | None, obj: Any, name: str) -> None:
        if self.active and run_id is not None:
            self._client.log_text(run_id, json.dumps(obj, indent=2, default=str), name)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if self.active and run_id is not None:
            for k, v in tags.items():
                self._client.set_tag(run_id, k, v)

    def lightning_logger(self, run_id: str | None) -> Any:
        """A Lightning MLFlowLogger writing into an existing (stage) run; None on other ranks.

        Not even a dormant logger there: its MlflowClient opens the store, and ranks that start together (one
        torchrun per node) would race rank zero's creation of a fresh SQLite store's tables."""
        if not self.active:
            return None
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name=self.cfg.logger.experiment_name,
            tracking_uri=self.uri,
            run_id=run_id,
            log_model=False,
        )
