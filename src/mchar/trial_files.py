"""What a sweep trial leaves on disk, and releasing it once the trial can no longer be the study's best.

A trial that trains publishes exports (``artifacts/<stage>/<trial name>``, ``artifacts/base_lm/<model.name>``) and
keeps Lightning checkpoints under its stage folders. A 100-trial search keeps 100 of each, although only the best
trial's are ever loaded again: a trial is never resumed from its checkpoints after it ends (an interrupted trial is
re-queued as a new one, with its own folder). With the spec's ``keep_files: best`` every finished trial that is not
the best (pruned, failed, or beaten) loses its exports and checkpoints; its MLflow runs, metrics and small files
(results, summaries) stay. A trial that is not the best never becomes the best again, so concurrent workers that
release from what the storage says agree without coordination, and a running trial is never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

FILES_ATTR = "mchar.files"  # the trial's releasable paths, recorded before it runs
KEEP_CHOICES = ("all", "best")
# stage-folder contents a finished trial never needs again (the stage folder's other files are kept)
BULKY = ("checkpoints", "export")


def trial_files(
    cfg: Any, trial_dir: Path, exporting: tuple[str, ...], own_name: bool, own_base: bool
) -> list[str]:
    """The paths a trial may write that are its own: its stage folders' checkpoints and export copies, and the
    exports it publishes under a per-trial ``name`` (``own_name``) or ``model.name`` (``own_base``). Exports under a
    name trials share (a base they all load) are never listed."""
    artifacts, trial_dir = Path(cfg.artifacts_dir).resolve(), trial_dir.resolve()  # workers may differ in cwd
    stages = list(cfg.stages)
    paths = [trial_dir / stage / bulky for stage in stages for bulky in BULKY]
    if own_name:
        paths += [artifacts / stage / cfg.name for stage in stages if stage in exporting]
    if own_base and "base_lm" in stages:
        paths.append(artifacts / "base_lm" / cfg.model.name)
    return [str(p) for p in paths]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def release(study: Any) -> tuple[list[int], int]:
    """Delete the recorded files of every finished trial that is not the study's best; returns (the trials that had
    something to delete, bytes freed). Paths the best trial or a running one also records are kept."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    try:
        best = study.best_trial.number
    except ValueError:  # nothing completed yet: pruned and failed trials can still go
        best = None
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    # a retry of a failed trial with the same swept values writes under the same derived name while it runs
    keep = {
        p
        for t in trials
        if t.number == best or t.state not in finished
        for p in t.user_attrs.get(FILES_ATTR, [])
    }
    released, freed = [], 0
    for t in trials:
        if t.state not in finished or t.number == best:
            continue
        gone = [Path(p) for p in t.user_attrs.get(FILES_ATTR, []) if p not in keep and Path(p).exists()]
        for path in gone:
            freed += _size(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if gone:
            released.append(t.number)
    return released, freed
