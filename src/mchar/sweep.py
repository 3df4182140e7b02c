"""Optuna sweeps driven directly (the Hydra optuna-sweeper plugin is stuck on optuna<3 and breaks on SQLite).

``python -m mchar sweep sweeps/NAME.yaml`` loads a study spec, validates it completely *before* any trial runs
(unknown keys, impossible values and missing files are one :class:`MCharError` line), then runs trials
in-process: each trial composes the config with its overrides and calls :func:`mchar.pipeline.run_pipeline`
with a pruning callback, under one MLflow study run (``mchar.role=study``) that nests every trial's run.

Spec (YAML)::

    study_name: budget_depth
    storage: sqlite:///runs/optuna.db      # any RDB URL (postgresql://..., mysql://...)
    direction: minimize
    metric: ppl/{allocator.policy}/delta_nll   # key of the stage's returned ``metrics`` dict (falls back to
    metric_stage: eval                         #   the stage run's MLflow metrics); {dotted.key} = config value;
                                               #   a list of keys: the objective is their mean
    monitor: val/delta_nll                 # Lightning metric the pruning callback watches (optional)
    n_trials: 54                           # total for the study: a rerun only runs what is missing
    sampler: {type: grid}                  # grid | tpe (seed, n_startup_trials) | random (seed)
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 0}   # median | percentile | hyperband | none
    search_space:
      allocator.budget: {type: int, values: [128, 256, 512]}     # grid: explicit values
      gistnet.lr: {type: float, low: 1e-4, high: 3e-3, log: true}
      gistnet.pooling: {type: categorical, choices: [mean, query]}
    base_overrides: [+experiment=quickstart, "stages=[eval]"]
    derived_overrides: ["eval.policies=[{allocator.policy}]"]    # filled from the trial's config ({trial}: its number)
    enqueue: [{gistnet.lr: 1e-3, gistnet.pooling: mean}]       # run first, once, never pruned (e.g. the defaults)
    keep_files: best        # all (default) | best: finished trials that are not the best lose exports + checkpoints

Trials never share files: each writes its stage folders under ``<run_dir>/<name>/sweeps/<study>/trial-<n>``. A
trial that trains GistNet, LensNet or e2e publishes ``artifacts/<stage>/<name>``, so such a spec must give every
trial its own ``name`` (a placeholder in a derived ``name=...``, e.g. ``name=gh_t{trial}``); with one fixed name
each trial would overwrite the exports of the experiment it starts from. The same holds for ``model.name`` when
the trials train the base with swept ``base_lm.*`` / ``model.*`` / ``data.*`` values (a later trial would reuse
the first one's base).

Every trial composes from one copy of ``conf/`` taken when the command starts (edits meanwhile change no trial).
Resuming: the same command continues the study (``load_if_exists``). A trial left RUNNING by a dead local
worker (host + pid + process start time in its user attrs) is marked FAIL and its parameters are re-queued
once; completed trials and grid points are never re-run. Across machines, Optuna heartbeats
(``heartbeat_interval``/``grace_period``) with ``RetryHeartbeatStaleTrialCallback`` do the same for remote workers.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mchar.errors import MCharError, first_line, redact_url
from mchar.processes import process_alive, process_start
from mchar.trial_files import FILES_ATTR, KEEP_CHOICES, release, trial_files

SPEC_KEYS = {
    "study_name",
    "storage",
    "direction",
    "metric",
    "metric_stage",
    "monitor",
    "n_trials",
    "sampler",
    "pruner",
    "search_space",
    "base_overrides",
    "derived_overrides",
    "heartbeat_interval",
    "grace_period",
    "max_retry",
    "description",
    "enqueue",
    "keep_files",
}
DIM_KEYS = {"type", "low", "high", "log", "step", "choices", "values"}
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]+)\}")
HOST_ATTR, PID_ATTR, START_ATTR = "worker_host", "worker_pid", "worker_start"


class SweepError(MCharError):
    """A bad sweep spec or search space, reported before any trial runs."""


class TrialFailed(Exception):
    """One trial failed (bad config, stage error, missing metric); the sweep records it and goes on."""


@dataclass
class Dimension:
    """One search-space axis over a dotted config key."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: list[Any] | None = None  # categorical choices, or explicit grid values

    def grid_values(self) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        if self.type == "int" and self.low is not None and self.high is not None:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise SweepError(f"search_space.{self.key}: a grid sampler needs explicit `values`")

    def rejects(self, value: Any) -> str | None:
        """Why ``value`` is not a point of this axis (None when it is)."""
        if self.values is not None:
            return None if value in self.values else f"is not one of {self.values}"
        if self.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            return "is not an integer"
        if not isinstance(value, int | float) or isinstance(value, bool):
            return "is not a number"
        if not float(self.low) <= value <= float(self.high):  # type: ignore[arg-type]
            return f"is outside [{self.low}, {self.high}]"
        return None

    def suggest(self, trial: Any, grid: bool) -> Any:
        if grid or self.type == "categorical":
            return trial.suggest_categorical(
                self.key, self.grid_values() if grid else list(self.values or [])
            )
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        if self.step is not None:
            return trial.suggest_float(self.key, float(self.low), float(self.high), step=float(self.step))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)


@dataclass
class SweepSpec:
    """A parsed study spec (see the module docstring)."""

    path: Path
    study_name: str
    search_space: dict[str, Dimension]
    storage: str = "sqlite:///runs/optuna.db"
    direction: str = "minimize"
    metric: str | list[str] = "final/delta_nll"
    metric_stage: str | None = None
    monitor: str | None = None
    n_trials: int | None = None
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    base_overrides: list[str] = field(default_factory=list)
    derived_overrides: list[str] = field(default_factory=list)
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    max_retry: int = 2
    # points of the search space every study runs first (once), e.g. the current defaults, so a search shows
    # whether it beat them
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    # what finished trials keep on disk: "all", or "best" (the others lose exports and checkpoints; mchar.trial_files)
    keep_files: str = "all"

    @property
    def metric_keys(self) -> list[str]:
        """The metric keys whose mean is the objective (one for most studies)."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def metric_label(self) -> str:
        return objective_label(self.metric_keys)

    @property
    def is_grid(self) -> bool:
        return self.sampler.get("type") == "grid"

    def grid(self) -> dict[str, list[Any]]:
        return {k: d.grid_values() for k, d in self.search_space.items()}

    def grid_size(self) -> int:
        n = 1
        for values in self.grid().values():
            n *= len(values)
        return n


def objective_label(keys: list[str]) -> str:
    """How an objective is named in logs and the study run: its key, or ``mean(a, b)``."""
    return keys[0] if len(keys) == 1 else f"mean({', '.join(keys)})"


def _parse_metric(value: Any) -> str | list[str]:
    """One metric key, or a list of keys averaged into one objective (e.g. a score on two held-out sets)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(k, str) and k for k in value):
        return value[0] if len(value) == 1 else [str(k) for k in value]
    raise SweepError(f"`metric` must be a metric key or a non-empty list of keys, got {value!r}")


def _as_kind(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return dict(value)
    raise SweepError(f"{what}: expected a name or a mapping with `type`, got {value!r}")


def _parse_dim(key: str, raw: Any) -> Dimension:
    if not isinstance(raw, dict):
        raise SweepError(f"search_space.{key}: expected a mapping like {{type: int, low: 1, high: 4}}")
    unknown = set(raw) - DIM_KEYS
    if unknown:
        raise SweepError(
            f"search_space.{key}: unknown field(s) {sorted(unknown)} (allowed: {sorted(DIM_KEYS)})"
        )
    kind = raw.get("type", "categorical" if "choices" in raw else None)
    if kind not in ("int", "float", "categorical"):
        raise SweepError(f"search_space.{key}: type must be int, float or categorical, got {kind!r}")
    values = raw.get("values", raw.get("choices"))
    if values is not None and (not isinstance(values, list) or not values):
        raise SweepError(f"search_space.{key}: `values`/`choices` must be a non-empty list")
    dim = Dimension(
        key=key,
        type=kind,
        low=raw.get("low"),
        high=raw.get("high"),
        log=bool(raw.get("log", False)),
        step=raw.get("step"),
        values=values,
    )
    if kind == "categorical" and values is None:
        raise SweepError(f"search_space.{key}: a categorical axis needs `choices`")
    if kind != "categorical" and values is None:
        if dim.low is None or dim.high is None:
            raise SweepError(f"search_space.{key}: needs `low` and `high` (or explicit `values`)")
        if dim.low > dim.high:
            raise SweepError(f"search_space.{key}: low {dim.low} > high {dim.high}")
        if dim.log and dim.low <= 0:
            raise SweepError(f"search_space.{key}: log scale needs low > 0")
    return dim


def load_spec(path: str | Path) -> SweepSpec:
    """Read and structurally check a spec file (semantic checks against the config: :func:`validate`)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep: spec file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep: {p}: invalid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep: {p}: expected a mapping at the top level")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SweepError(f"sweep: {p}: unknown key(s) {sorted(unknown)} (allowed: {sorted(SPEC_KEYS)})")
    space = raw.get("search_space")
    if not isinstance(space, dict) or not space:
        raise SweepError(f"sweep: {p}: `search_space` must be a non-empty mapping of dotted config keys")
    try:
        spec = SweepSpec(
            path=p,
            study_name=str(raw.get("study_name") or p.stem),
            search_space={str(k): _parse_dim(str(k), v) for k, v in space.items()},
            storage=str(raw.get("storage") or "sqlite:///runs/optuna.db"),
            direction=str(raw.get("direction", "minimize")),
            metric=_parse_metric(raw.get("metric", "final/delta_nll")),
            metric_stage=raw.get("metric_stage"),
            monitor=raw.get("monitor"),
            n_trials=raw.get("n_trials"),
            sampler=_as_kind(raw.get("sampler", {"type": "tpe", "seed": 0}), "sampler"),
            pruner=_as_kind(raw.get("pruner", {"type": "median"}), "pruner"),
            base_overrides=[str(o) for o in raw.get("base_overrides") or []],
            derived_overrides=[str(o) for o in raw.get("derived_overrides") or []],
            heartbeat_interval=raw.get("heartbeat_interval"),
            grace_period=raw.get("grace_period"),
            max_retry=int(raw.get("max_retry", 2)),
            enqueue=_parse_enqueue(raw.get("enqueue")),
            keep_files=str(raw.get("keep_files", "all")),
        )
    except SweepError as err:
        raise SweepError(f"sweep: {p}: {err}") from None
    if spec.direction not in ("minimize", "maximize"):
        raise SweepError(f"sweep: {p}: direction must be minimize or maximize, got {spec.direction!r}")
    if spec.sampler["type"] not in ("grid", "tpe", "random"):
        raise SweepError(
            f"sweep: {p}: sampler.type must be grid, tpe or random, got {spec.sampler['type']!r}"
        )
    if spec.pruner["type"] not in ("median", "percentile", "hyperband", "successive_halving", "none"):
        raise SweepError(f"sweep: {p}: unknown pruner {spec.pruner['type']!r}")
    if spec.keep_files not in KEEP_CHOICES:
        raise SweepError(
            f"sweep: {p}: keep_files must be one of {', '.join(KEEP_CHOICES)}, got {spec.keep_files!r}"
        )
    if spec.n_trials is not None and (not isinstance(spec.n_trials, int) or spec.n_trials < 1):
        raise SweepError(f"sweep: {p}: n_trials must be a positive integer, got {spec.n_trials!r}")
    if spec.is_grid:
        try:
            spec.grid()
        except SweepError as err:
            raise SweepError(f"sweep: {p}: {err}") from None
        if spec.enqueue:
            raise SweepError(f"sweep: {p}: enqueue: a grid sampler runs every point already")
    for point in spec.enqueue:
        for key, value in point.items():
            dim = spec.search_space.get(key)
            if dim is None:
                raise SweepError(f"sweep: {p}: enqueue: {key!r} is not a search_space key")
            problem = dim.rejects(value)
            if problem:
                raise SweepError(f"sweep: {p}: enqueue: {key}={value!r} {problem}")
    return spec


def _parse_enqueue(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(pt, dict) and pt for pt in raw):
        raise SweepError("enqueue: expected a list of non-empty mappings {dotted.key: value}")
    return [{str(k): v for k, v in pt.items()} for pt in raw]


def override(key: str, value: Any) -> str:
    """A Hydra override for one value (lists as ``[a,b]``, booleans lower-case)."""
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"


def fill(template: str, values: dict[str, str], what: str) -> str:
    """Replace ``{dotted.key}`` placeholders with config values."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise SweepError(f"{what}: {{{m.group(1)}}} is not a config key")
        return values[m.group(1)]

    return PLACEHOLDER.sub(sub, template)


def trial_overrides(
    spec: SweepSpec, params: dict[str, Any], extra: list[str], base_flat: dict[str, str], number: int = 0
) -> list[str]:
    """Overrides of one trial: base, CLI extras, the sampled values, then derived ones (filled from them and
    ``{trial}``, the trial's number)."""
    sampled = [override(k, v) for k, v in params.items()]
    known = {**base_flat, **{k: str(v) for k, v in params.items()}, "trial": str(number)}
    derived = [fill(o, known, "derived_overrides") for o in spec.derived_overrides]
    return [*spec.base_overrides, *extra, *sampled, *derived]


def validate(spec: SweepSpec, extra: list[str]) -> Any:
    """Compose the base config and every categorical/grid value; any error is one line, before trial 0."""
    from mchar.compose import compose_config, flatten
    from mchar.config import STAGES

    try:
        base = compose_config([*spec.base_overrides, *extra])
    except MCharError as err:
        raise SweepError(f"sweep: {spec.path}: base_overrides: {err}") from None
    flat = flatten(base)
    for key, dim in spec.search_space.items():
        if key not in flat:
            close = difflib.get_close_matches(key, list(flat), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SweepError(f"sweep: {spec.path}: search_space: unknown config key {key!r}{hint}")
        candidates = dim.grid_values() if (spec.is_grid or dim.type == "categorical") else []
        for value in candidates:
            overrides = trial_overrides(spec, {key: value}, extra, flat)
            try:
                compose_config(overrides)
            except SweepError:
                raise
            except MCharError as err:
                if any(k != key and k in str(err) for k in spec.search_space):
                    continue  # may be fine combined with another swept value: that trial decides
                raise SweepError(f"sweep: {spec.path}: search_space.{key}={value!r}: {err}") from None
    for point in spec.enqueue:
        try:
            compose_config(trial_overrides(spec, point, extra, flat))
        except MCharError as err:
            raise SweepError(f"sweep: {spec.path}: enqueue {point}: {err}") from None
    for template in spec.derived_overrides:
        fill(
            template,
            {**flat, **{k: "x" for k in spec.search_space}, "trial": "0"},
            f"sweep: {spec.path}: derived_overrides",
        )
    check_own_exports(spec, list(base.stages))
    stage = spec.metric_stage or _default_stage(list(base.stages))
    if stage not in STAGES or stage not in base.stages:
        raise SweepError(
            f"sweep: {spec.path}: metric_stage {stage!r} is not among the trial's stages {list(base.stages)}"
        )
    for key in spec.metric_keys:
        fill(key, {**flat, **{k: "x" for k in spec.search_space}}, f"sweep: {spec.path}: metric")
    return base


EXPORTING_STAGES = ("gistnet", "lensnet", "e2e")  # publish artifacts/<stage>/<name>
BASE_KEYS = ("base_lm.", "model.", "data.")  # what a trained base depends on


def _varies(spec: SweepSpec, key: str) -> bool:
    """Whether ``key`` differs between trials: swept, or derived from ``{trial}`` or a swept value."""
    varying = {"trial", *spec.search_space}
    return key in spec.search_space or any(
        o.split("=", 1)[0].lstrip("+") == key and varying & set(PLACEHOLDER.findall(o))
        for o in spec.derived_overrides
    )


def check_own_exports(spec: SweepSpec, stages: list[str]) -> None:
    """Trials that publish exports need a name each: under one name every trial overwrites the exports of the
    experiment it starts from (``artifacts/gistnet/quickstart``), and the last trial's stay."""
    exporting = [s for s in stages if s in EXPORTING_STAGES]
    if exporting and not _varies(spec, "name"):
        raise SweepError(
            f"sweep: {spec.path}: trials train {', '.join(exporting)} under one name, so each would overwrite "
            f"artifacts/{exporting[0]}/<name>; give each its own, e.g. derived_overrides: "
            f"[name={spec.study_name}_t{{trial}}]"
        )
    base_keys = [k for k in spec.search_space if k.startswith(BASE_KEYS) and k != "model.name"]
    if "base_lm" in stages and base_keys and not _varies(spec, "model.name"):
        raise SweepError(
            f"sweep: {spec.path}: trials train the base with different {', '.join(base_keys)} under one "
            f"model.name, so every trial after the first would reuse the first one's base; derive model.name too, "
            f"e.g. model.name={spec.study_name}_lm_t{{trial}}"
        )


def check_inputs(spec: SweepSpec, base: Any) -> None:
    """The inputs every trial shares (exports it loads, task files): one that is missing would fail every trial, so
    it stops the sweep before the storage is touched. Apart from :func:`validate`, which checks the spec alone."""
    from mchar.pipeline import preflight

    try:
        preflight(base)
    except MCharError as err:
        raise SweepError(f"sweep: {spec.path}: {err}") from None


def _default_stage(stages: list[str]) -> str:
    real = [s for s in stages if s != "report"]
    return real[-1] if real else stages[-1]


# ----------------------------------------------------------------------------------------------- storage / study


def _retry_callback(max_retry: int) -> Any:
    """Optuna's re-queue-a-dead-trial callback (copies params and grid id; marked experimental, hence quiet)."""
    import warnings

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def make_storage(spec: SweepSpec) -> Any:
    """RDB storage; heartbeats (for workers on other machines) when the spec asks or the DB is not SQLite."""
    import optuna
    from optuna.storages import RDBStorage

    url = spec.storage
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    interval = spec.heartbeat_interval
    if interval is None and not url.startswith("sqlite"):
        interval = 60
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if interval:
        kwargs.update(
            heartbeat_interval=int(interval),
            grace_period=int(spec.grace_period or 3 * interval),
            heartbeat_stale_trial_callback=_retry_callback(spec.max_retry),
        )
    try:
        return RDBStorage(url, **kwargs)
    except (optuna.exceptions.StorageInternalError, ValueError, ImportError) as err:
        raise SweepError(f"sweep: storage {redact_url(url)}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # sqlalchemy errors (bad driver, unreachable host)
        raise SweepError(
            f"sweep: storage {redact_url(url)}: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from None


def make_sampler(spec: SweepSpec) -> Any:
    import optuna

    s = spec.sampler
    if s["type"] == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=s.get("seed", 0))
    if s["type"] == "random":
        return optuna.samplers.RandomSampler(seed=s.get("seed", 0))
    return optuna.samplers.TPESampler(
        seed=s.get("seed", 0), n_startup_trials=int(s.get("n_startup_trials", 10))
    )


def make_pruner(spec: SweepSpec) -> Any:
    import optuna

    p = dict(spec.pruner)
    kind = p.pop("type")
    if kind == "none":
        return optuna.pruners.NopPruner()
    cls = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[kind]
    try:
        return cls(**p)
    except TypeError as err:
        raise SweepError(f"sweep: {spec.path}: pruner: {err}") from None


def _retried_numbers(trials: list[Any]) -> set[int]:
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", []))
    return out


def requeue(study: Any, trial: Any, max_retry: int) -> None:
    """Queue ``trial``'s parameters again, once (idempotent across repeated crashes)."""
    if trial.number not in _retried_numbers(study.get_trials(deepcopy=False)):
        _retry_callback(max_retry)(study, trial)


def recover_dead_trials(study: Any, max_retry: int) -> list[int]:
    """Mark RUNNING trials of dead local workers FAIL and re-queue their parameters; returns their numbers."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(HOST_ATTR) != host or PID_ATTR not in t.user_attrs:
            continue  # another machine's worker: Optuna heartbeats decide
        if process_alive(int(t.user_attrs[PID_ATTR]), str(t.user_attrs.get(START_ATTR, ""))):
            continue
        requeue(study, t, max_retry)
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "worker died (interrupted)")
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        recovered.append(t.number)
    return recovered


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        math.isclose(float(v), float(b[k]), rel_tol=1e-12)
        if isinstance(v, int | float) and isinstance(b[k], int | float)
        else v == b[k]
        for k, v in a.items()
    )


def enqueue_points(study: Any, points: list[dict[str, Any]]) -> None:
    """Queue each reference point unless a trial with exactly its values is waiting, running or finished unpruned
    (enqueued trials are never pruned: a reference that stops early has no final number to compare against)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for point in points:
        if not any(
            t.state != TrialState.PRUNED and _same_point(t.system_attrs.get("fixed_params", t.params), point)
            for t in trials
        ):
            study.enqueue_trial(point)


def finished_count(study: Any) -> int:
    """Trials that count toward ``n_trials``: complete, pruned, or failed and not retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    return sum(
        1
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.number not in retried)
    )


# ----------------------------------------------------------------------------------------------- MLflow study run


class StudyRun:
    """The MLflow parent run of a study; reused on resume (its id lives in the study's user attrs)."""

    def __init__(self, spec: SweepSpec, base_cfg: Any, study: Any) -> None:
        from mchar.tracking.mlflow_tracking import Tracker

        self.spec = spec
        self.tracker = Tracker(base_cfg, "sweep")
        self.client = self.tracker.client
        self.run_id: str | None = None
        if self.client is None:
            return
        known = study.user_attrs.get("mlflow_run_id")
        if known:
            try:
                self.client.get_run(known)
                self.run_id = known
                self.client.update_run(known, status="RUNNING")
            except Exception:  # another tracking store: start a fresh study run there
                self.run_id = None
        if self.run_id is None:
            tags = {
                "mchar.role": "study",
                "mchar.study": spec.study_name,
                "optuna.storage": redact_url(spec.storage),
                "argv": " ".join(sys.argv)[:5000],
                "command": "sweep",
            }
            run = self.client.create_run(
                self.tracker.experiment_id, run_name=f"study:{spec.study_name}", tags=tags
            )
            self.run_id = run.info.run_id
            study.set_user_attr("mlflow_run_id", self.run_id)
            for k, v in {
                "study_name": spec.study_name,
                "direction": spec.direction,
                "metric": spec.metric_label,
                "sampler": spec.sampler["type"],
                "pruner": spec.pruner["type"],
                "search_space": ",".join(spec.search_space),
            }.items():
                self.client.log_param(self.run_id, k, str(v)[:6000])
            self.client.log_text(self.run_id, spec.path.read_text(), "sweep/spec.yaml")

    def log_conf(self, conf: Path, fingerprint: str) -> None:
        """The config groups every trial of this run composes from, as ``sweep/conf-<fingerprint>/``."""
        if self.client is not None and self.run_id is not None:
            self.client.log_artifacts(self.run_id, str(conf), f"sweep/conf-{fingerprint}")

    def close_orphans(self, study_name: str, numbers: list[int]) -> None:
        """Mark the MLflow runs of interrupted trials (and their stage runs) KILLED instead of RUNNING forever."""
        if self.client is None or not numbers:
            return
        for n in numbers:
            runs = self.client.search_runs(
                [self.tracker.experiment_id],
                f"tags.`mchar.study` = '{study_name}' and tags.`mchar.trial` = '{n}' "
                "and attributes.status = 'RUNNING'",
            )
            for run in runs:
                for child in self.client.search_runs(
                    [self.tracker.experiment_id],
                    f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'",
                ):
                    self.client.set_terminated(child.info.run_id, status="KILLED")
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def on_trial_end(self, study: Any, trial: Any) -> None:
        if self.spec.keep_files == "best":
            released, freed = release(study)
            if released:
                print(
                    f"[sweep {self.spec.study_name}] keep_files=best: freed {freed / 2**20:.1f} MiB of exports and "
                    f"checkpoints of trial(s) {released}",
                    file=sys.stderr,
                    flush=True,
                )
        if self.client is None or self.run_id is None:
            return
        from optuna.trial import TrialState

        if trial.state == TrialState.COMPLETE and trial.value is not None:
            self.tracker.log_metrics(self.run_id, {"trial/value": trial.value}, step=trial.number)
            with contextlib.suppress(ValueError):
                self.tracker.log_metrics(self.run_id, {"best/value": study.best_value}, step=trial.number)
        self.tracker.log_metrics(self.run_id, {f"trials/{trial.state.name.lower()}": 1.0}, step=trial.number)

    def finish(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


# ----------------------------------------------------------------------------------------------- objective


def pruning_callback(trial: Any, monitor: str) -> Any:
    """Optuna's Lightning pruning callback, reporting at the global step.

    mchar stages train by steps inside one long epoch, so the stock callback (keyed by epoch) would report
    step 0 again and again and Optuna would ignore every value after the first.
    """
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    class StepPruningCallback(PyTorchLightningPruningCallback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if self.is_ddp_backend or trainer.sanity_checking:
                return super().on_validation_end(trainer, pl_module)
            score = trainer.callback_metrics.get(self.monitor)
            if score is None:
                return super().on_validation_end(trainer, pl_module)  # warns about the missing metric
            self._trial.report(float(score), step=int(trainer.global_step))
            if self._trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at step {trainer.global_step} ({self.monitor}={float(score):.4g})"
                )

    return StepPruningCallback(trial, monitor=monitor)


def extract_metric(ctx: Any, tracker: Any, stage: str, key: str) -> float:
    """The stage's returned ``metrics[key]``, else the stage run's MLflow metric ``key``."""
    result = ctx.results.get(stage)
    if isinstance(result, dict):
        metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
        if key in metrics:
            return float(metrics[key])
        if key in result and isinstance(result[key], (int, float)):
            return float(result[key])
    parent = ctx.results.get("parent_run_id")
    have: list[str] = sorted((result or {}).get("metrics", {}) or {}) if isinstance(result, dict) else []
    if tracker.client is not None and parent:
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.`mchar.stage` = '{stage}'",
        )
        for run in runs:
            if key in run.data.metrics:
                return float(run.data.metrics[key])
            have += sorted(run.data.metrics)
    raise TrialFailed(
        f"metric {key!r} not found in stage {stage!r} (has: {', '.join(have[:12]) or 'nothing'})"
    )


class Objective:
    """One trial = compose -> run_pipeline (nested under the study run) -> the metric."""

    def __init__(
        self,
        spec: SweepSpec,
        extra: list[str],
        base_flat: dict[str, str],
        study_run: StudyRun,
        base_stages: list[str],
    ) -> None:
        self.spec, self.extra, self.base_flat, self.study_run = spec, extra, base_flat, study_run
        self.stage = spec.metric_stage or _default_stage(base_stages)
        self.current: Any = None

    def __call__(self, trial: Any) -> float:
        import optuna

        from mchar.compose import compose_config, flatten
        from mchar.pipeline import run_pipeline
        from mchar.tracking.mlflow_tracking import Tracker

        self.current = trial
        pid = os.getpid()
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        trial.set_user_attr(PID_ATTR, pid)
        trial.set_user_attr(START_ATTR, process_start(pid))
        params = {key: dim.suggest(trial, self.spec.is_grid) for key, dim in self.spec.search_space.items()}
        system_attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
        retry_of = system_attrs.get("failed_trial")
        label = f"[sweep {self.spec.study_name}] trial {trial.number}" + (
            f" (retry of {retry_of})" if retry_of is not None else ""
        )
        print(f"{label}: {params}", file=sys.stderr, flush=True)
        try:
            cfg = compose_config(trial_overrides(self.spec, params, self.extra, self.base_flat, trial.number))
        except MCharError as err:
            return self._fail(trial, str(err), label)
        cfg.logger.run_name = f"{self.spec.study_name}/trial-{trial.number}"
        tags = {
            "mlflow.parentRunId": self.study_run.run_id or "",
            "mchar.study": self.spec.study_name,
            "mchar.trial": str(trial.number),
        }
        if retry_of is not None:
            tags["mchar.retry_of"] = str(retry_of)
        tracker = Tracker(cfg, "sweep", parent_tags={k: v for k, v in tags.items() if v})
        enqueued = "fixed_params" in system_attrs  # a reference point (spec `enqueue`) runs to the end
        callbacks = [pruning_callback(trial, self.spec.monitor)] if self.spec.monitor and not enqueued else []
        t0 = time.perf_counter()
        scope = f"sweeps/{self.spec.study_name}/trial-{trial.number}"
        own = (_varies(self.spec, "name"), _varies(self.spec, "model.name"))
        trial_dir = Path(cfg.run_dir) / cfg.name / scope
        trial.set_user_attr(FILES_ATTR, trial_files(cfg, trial_dir, EXPORTING_STAGES, *own))
        try:
            ctx = run_pipeline(cfg, command="sweep", callbacks=callbacks, tracker=tracker, scope=scope)
            keys = [fill(k, flatten(cfg), "metric") for k in self.spec.metric_keys]
            value = sum(extract_metric(ctx, tracker, self.stage, k) for k in keys) / len(keys)
            metric = objective_label(keys)
        except optuna.TrialPruned:
            tracker.set_tags(tracker.parent_id, {"optuna.state": "PRUNED"})
            print(f"{label}: pruned", file=sys.stderr, flush=True)
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            tracker.set_tags(tracker.parent_id, {"optuna.state": "FAIL"})
            return self._fail(trial, first_line(err, typed=True), label)
        trial.set_user_attr("mlflow_run_id", tracker.parent_id or "")
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        if value != value:  # NaN
            return self._fail(trial, f"metric {metric!r} is NaN", label)
        tracker.set_tags(tracker.parent_id, {"optuna.state": "COMPLETE", "optuna.value": repr(value)})
        print(
            f"{label}: {metric} = {value:.6g} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True
        )
        return value

    @staticmethod
    def _fail(trial: Any, reason: str, label: str) -> float:
        trial.set_user_attr("fail_reason", reason[:2000])
        print(f"{label}: FAILED: {reason}", file=sys.stderr, flush=True)
        raise TrialFailed(reason)


# ----------------------------------------------------------------------------------------------- driver


SPEC_ATTR = "mchar.spec_fingerprint"
COSMETIC = ("trainer.enable_progress_bar",)  # extra overrides that cannot change a trial's result


def spec_fingerprint(spec: SweepSpec, extra: list[str]) -> str:
    """Hash of what decides a trial's result besides its sampled values: the fixed, derived and extra overrides,
    the objective and the search space. A study is continued only under the same fingerprint, so trials run on
    other models, data or documents never end up side by side in one study."""
    import dataclasses
    import hashlib
    import json

    payload = {
        "base_overrides": spec.base_overrides,
        "derived_overrides": spec.derived_overrides,
        "extra": [o for o in extra if not o.lstrip("+~").startswith(COSMETIC)],
        "metric": spec.metric,
        "metric_stage": spec.metric_stage,
        "search_space": {k: dataclasses.asdict(d) for k, d in sorted(spec.search_space.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_spec(study: Any, spec: SweepSpec, extra: list[str]) -> None:
    """Refuse to continue a study that was run under another spec (first run: record the fingerprint)."""
    fp = spec_fingerprint(spec, extra)
    known = study.user_attrs.get(SPEC_ATTR)
    if known is None:
        study.set_user_attr(SPEC_ATTR, fp)
    elif known != fp:
        raise SweepError(
            f"sweep: study {spec.study_name!r} in {redact_url(spec.storage)} was run with other overrides, objective "
            f"or search space (spec {known}, now {fp}); give the spec a new study_name, or delete the old study: "
            f"optuna delete-study --study-name {spec.study_name} --storage URL"
        )


def run_sweep(
    spec_path: str | Path, n_trials: int | None = None, extra_overrides: list[str] | None = None
) -> Any:
    """Create or resume the study and run trials until it holds ``n_trials`` finished ones; returns the study.

    Every trial composes from one copy of ``conf/`` taken at start (:func:`mchar.compose.frozen_conf`), so editing
    the config groups while a sweep runs changes none of its trials."""
    from mchar.compose import frozen_conf

    spec = load_spec(spec_path)
    with frozen_conf() as conf:
        return _run_study(spec, conf, n_trials, list(extra_overrides or []))


CONF_ATTR = "mchar.conf_fingerprint"


def check_same_conf(study: Any, spec: SweepSpec, conf: Path) -> str:
    """Record the study's ``conf/`` fingerprint; warn (not refuse) when a resumed study's config groups changed:
    its later trials then compose other defaults than its earlier ones."""
    from mchar.compose import conf_fingerprint

    fp = conf_fingerprint(conf)
    known = study.user_attrs.get(CONF_ATTR)
    if known is not None and known != fp:
        print(
            f"[sweep {spec.study_name}] warning: conf/ changed since this study started (conf {known}, now {fp}); "
            "the trials run from now compose the new defaults (MLflow: the study run's sweep/conf-* artifacts)",
            file=sys.stderr,
            flush=True,
        )
    study.set_user_attr(CONF_ATTR, fp)
    return fp


def _run_study(spec: SweepSpec, conf: Path, n_trials: int | None, extra: list[str]) -> Any:
    import logging

    import optuna

    from mchar.compose import flatten

    base = validate(spec, extra)
    check_inputs(spec, base)
    total = n_trials or spec.n_trials or (spec.grid_size() if spec.is_grid else 20)
    if spec.is_grid:
        total = min(total, spec.grid_size())
    # mchar prints one line per trial itself; Optuna would add a traceback for every failed trial.
    optuna.logging.get_logger("optuna").setLevel(logging.ERROR)
    storage = make_storage(spec)
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=storage,
        direction=spec.direction,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    check_same_spec(study, spec, extra)
    conf_fp = check_same_conf(study, spec, conf)
    enqueue_points(study, spec.enqueue)
    study_run = StudyRun(spec, base, study)
    study_run.log_conf(conf, conf_fp)
    recovered = recover_dead_trials(study, spec.max_retry)
    if recovered:
        print(f"[sweep {spec.study_name}] re-queued interrupted trial(s) {recovered}", file=sys.stderr)
        study_run.close_orphans(spec.study_name, recovered)
    objective = Objective(spec, extra, flatten(base), study_run, list(base.stages))
    done = finished_count(study)
    print(
        f"[sweep {spec.study_name}] {done}/{total} trials finished; storage {redact_url(spec.storage)}",
        file=sys.stderr,
        flush=True,
    )
    status = "FAILED"
    try:
        while done < total:
            study.optimize(
                objective,
                n_trials=1,
                catch=(TrialFailed, Exception),
                callbacks=[study_run.on_trial_end],
                gc_after_trial=True,
            )
            done = finished_count(study)
        status = "FINISHED"
    except KeyboardInterrupt:
        trial = objective.current
        if trial is not None:  # Optuna marked it FAIL; queue its parameters again for the next run
            frozen = study._storage.get_trial(trial._trial_id)
            requeue(study, frozen, spec.max_retry)
        status = "KILLED"
        raise
    finally:
        study_run.finish(status)
    _summary(study, spec)
    return study


def _summary(study: Any, spec: SweepSpec) -> None:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{s.name.lower()} {states.count(s)}" for s in TrialState if states.count(s))
    best = ""
    with contextlib.suppress(ValueError):
        best = f"; best {spec.metric_label} = {study.best_value:.6g} with {study.best_params}"
    print(f"[sweep {spec.study_name}] {counts}{best}", file=sys.stderr, flush=True)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every grid point, in order (for tests and reports)."""
    grid = spec.grid()
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
