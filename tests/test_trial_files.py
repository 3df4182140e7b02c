"""Releasing a sweep's trial files: only finished trials that are not the best, never a path the best or a running
trial also records (a real in-memory Optuna study)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mchar.trial_files import FILES_ATTR, release


def _files(tmp: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        path = tmp / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights").write_bytes(b"x" * 100)
        out.append(str(path))
    return out


def _add(study: optuna.Study, state: TrialState, files: list[str], value: float | None = None) -> None:
    study.add_trial(
        create_trial(
            state=state,
            value=value,
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            user_attrs={FILES_ATTR: files},
        )
    )


def test_release_keeps_the_best_and_running_trials_paths(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize")
    _add(study, TrialState.COMPLETE, _files(tmp_path, "t0"), value=2.0)  # beaten by trial 1
    _add(study, TrialState.COMPLETE, _files(tmp_path, "t1", "shared"), value=1.0)  # the best
    _add(study, TrialState.PRUNED, _files(tmp_path, "t2", "shared"))  # shares a path with the best
    _add(study, TrialState.FAIL, _files(tmp_path, "t3", "retried"))
    _add(study, TrialState.WAITING, _files(tmp_path, "retried"))  # its retry, same derived name, not yet run
    released, freed = release(study)
    assert released == [0, 2, 3] and freed == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retried", "shared", "t1"]
    assert release(study) == ([], 0)  # nothing left to release: idempotent


def test_release_without_a_completed_trial_frees_pruned_and_failed_ones(tmp_path: Path) -> None:
    study = optuna.create_study()
    _add(study, TrialState.PRUNED, _files(tmp_path, "a"))
    _add(study, TrialState.FAIL, [str(tmp_path / "never-written")])
    assert release(study) == ([0], 100)
    assert not (tmp_path / "a").exists()
