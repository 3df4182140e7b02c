"""Releasing a sweep's trial files: only finished trials that are not the best, never a path the best or a running
trial also records (a real in-memory Optuna study)."""

from __future__ import annotations

from pathlib import Path

import optuna
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


STATES = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.WAITING]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    trials=st.lists(
        st.tuples(st.sampled_from(STATES), st.floats(0, 10), st.lists(st.integers(0, 5), max_size=3)),
        min_size=1,
        max_size=8,
    )
)
def test_release_frees_exactly_the_paths_no_kept_trial_records(tmp_path: Path, trials: list) -> None:
    """Any mix of trial states, values and shared paths: a path survives iff the best trial or an unfinished one
    records it; every other recorded path is gone, and a second release frees nothing."""
    root = tmp_path / str(len(list(tmp_path.iterdir())))
    study = optuna.create_study(direction="minimize")
    for state, value, names in trials:
        _add(
            study,
            state,
            _files(root, *(f"p{n}" for n in names)),
            value if state == TrialState.COMPLETE else None,
        )
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = min(completed, key=lambda t: t.value).number if completed else None
    kept = {
        p
        for t in study.trials
        if t.number == best or t.state == TrialState.WAITING
        for p in t.user_attrs[FILES_ATTR]
    }
    recorded = {p for t in study.trials for p in t.user_attrs[FILES_ATTR]}
    release(study)
    assert {p for p in recorded if Path(p).exists()} == kept
    assert release(study) == ([], 0)
