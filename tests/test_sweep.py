"""Sweeps: grid/pruning/failure handling, nested MLflow runs, bad specs, and kill -9 resume.

The real stages are too slow for a unit test, so the ``eval`` stage is replaced (monkeypatched into
``mchar.pipeline.STAGE_MODULES``) by :func:`toy_stage`: a real Lightning Trainer on a one-parameter module whose
validation metric is a known function of ``allocator.budget``/``tree.depth``, so pruning is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = "tests.test_sweep:toy_stage"


def toy_value(budget: int, depth: int) -> float:
    return budget / 100 + depth


def toy_stage(ctx: Any, run_id: str | None) -> dict[str, Any]:
    """A fast stand-in for a training stage; fails for policy ``oracle``; sleeps when told (kill test)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from mchar.lit.trainer import build_trainer

    cfg = ctx.cfg
    budget, depth, policy = cfg.allocator.budget, cfg.tree.depth, cfg.allocator.policy
    log = os.environ.get("MCHAR_TOY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(
                json.dumps(
                    {
                        "budget": budget,
                        "depth": depth,
                        "policy": policy,
                        "seed": cfg.seed,
                        "pid": os.getpid(),
                        "stage_dir": str(ctx.stage_dir("eval")),
                    }
                )
                + "\n"
            )
    if policy == "oracle":
        raise RuntimeError("toy stage cannot run the oracle")
    edit = os.environ.get("MCHAR_TOY_EDIT_CONF")
    if edit:  # someone adds a key to a config group while the sweep runs
        group = Path(edit) / "lensnet" / "default.yaml"
        if "a_key_the_schema_lacks" not in group.read_text():
            group.write_text(group.read_text() + "a_key_the_schema_lacks: 1\n")
    if os.environ.get("MCHAR_TOY_SLEEP_BUDGET") == str(budget):
        time.sleep(120)
    target = toy_value(budget, depth)

    class Toy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return ((self.w - batch[0]) ** 2).mean()

        def validation_step(self, batch: Any, _: int) -> None:
            self.log("val/delta_nll", torch.tensor(target))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=2)
    trainer = build_trainer(
        cfg.trainer,
        4,
        None,
        logger=ctx.tracker.lightning_logger(run_id),
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=ctx.callbacks,
    )
    trainer.fit(Toy(), train_dataloaders=data, val_dataloaders=data)
    ctx.tracker.log_metrics(run_id, {"final/delta_nll": target, "final/doubled": 2 * target})
    return {"metrics": {"final/delta_nll": target}}  # final/doubled only in MLflow (the fallback)


def toy_export_stage(ctx: Any, run_id: str | None) -> dict[str, Any]:
    """:func:`toy_stage` as a GistNet stage that first writes what a real one leaves: a checkpoint and an export
    copy in its stage folder, a small summary beside them, and the published ``artifacts/gistnet/<name>``."""
    stage = ctx.stage_dir("gistnet")
    for path in (stage / "checkpoints" / "last.ckpt", stage / "export" / "model.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    (stage / "summary.json").write_text("{}")
    shared = ctx.artifacts_dir / "gistnet" / ctx.cfg.name
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "model.safetensors").write_bytes(b"x" * 1000)
    return toy_stage(ctx, run_id)


def write_spec(
    tmp: Path,
    name: str = "toy",
    space: str | None = None,
    extra: str = "",
    derived: str = '"eval.policies=[{allocator.policy}]"',
) -> Path:
    space = (
        space
        or """
      allocator.budget: {type: int, values: [64, 128, 256]}
      allocator.policy: {type: categorical, choices: [recency, oracle]}
    """
    )
    body = f"""
    study_name: {name}
    storage: sqlite:///{tmp}/optuna.db
    direction: minimize
    metric: final/delta_nll
    metric_stage: eval
    monitor: val/delta_nll
    sampler: {{type: grid}}
    pruner: {{type: median, n_startup_trials: 1, n_warmup_steps: 0}}
    base_overrides:
      - +experiment=smoke
      - stages=[eval]
      - run_dir={tmp}/runs
      - artifacts_dir={tmp}/artifacts
      - logger.tracking_uri=sqlite:///{tmp}/mlflow.db
      - trainer.enable_progress_bar=false
    derived_overrides: [{derived}]
    search_space:
    """
    path = tmp / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(body) + textwrap.indent(textwrap.dedent(space).strip() + "\n", "  ") + extra
    )
    return path


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import mchar.pipeline

    monkeypatch.setitem(mchar.pipeline.STAGE_MODULES, "eval", TOY)
    monkeypatch.setenv("MCHAR_TOY_LOG", str(tmp_path / "toy.log"))
    return tmp_path


def toy_log(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "toy.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_grid_sweep_prunes_fails_nests_and_resumes(toy: Path) -> None:
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from mchar.sweep import run_sweep

    spec = write_spec(toy)
    t0 = time.perf_counter()
    study = run_sweep(spec)
    print(f"6-trial toy sweep: {time.perf_counter() - t0:.1f}s")
    by_params = {(t.params["allocator.budget"], t.params["allocator.policy"]): t for t in study.trials}
    assert len(study.trials) == 6 and len(by_params) == 6  # every grid point once
    recency = sorted(
        (t for t in study.trials if t.params["allocator.policy"] == "recency"), key=lambda t: t.number
    )
    assert recency[0].state == TrialState.COMPLETE  # the first has nothing to be compared with
    for t in recency:  # pruned exactly when worse than an earlier completed trial (median of one or two)
        earlier = [
            toy_value(u.params["allocator.budget"], 2)
            for u in recency
            if u.number < t.number and u.state == TrialState.COMPLETE
        ]
        value = toy_value(t.params["allocator.budget"], 2)
        if earlier and value > sorted(earlier)[(len(earlier) - 1) // 2]:
            assert t.state == TrialState.PRUNED, t
        else:
            assert t.state == TrialState.COMPLETE and t.value == pytest.approx(value)
    assert study.best_params == {"allocator.budget": 64, "allocator.policy": "recency"}
    # trials under one name never share a stage folder (results, checkpoints): one each, under the study's
    folders = [Path(r["stage_dir"]) for r in toy_log(toy)]
    assert len(set(folders)) == 6
    assert {f.relative_to(toy / "runs" / "smoke").parts[:2] for f in folders} == {("sweeps", "toy")}
    assert sorted(f.parent.name for f in folders) == [f"trial-{i}" for i in range(6)]
    for budget in (64, 128, 256):  # the stage raised: FAIL with the one-line reason, the sweep went on
        t = by_params[(budget, "oracle")]
        assert t.state == TrialState.FAIL
        assert "toy stage cannot run the oracle" in t.user_attrs["fail_reason"]

    client = MlflowClient(f"sqlite:///{toy}/mlflow.db")
    exp = client.get_experiment_by_name("mchar")
    studies = client.search_runs([exp.experiment_id], "tags.`mchar.role` = 'study'")
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
    study_run = studies[0].info.run_id
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{study_run}'")
    assert len(trials) == 6
    assert {r.data.tags["mchar.trial"] for r in trials} == {str(i) for i in range(6)}
    assert {r.data.params["allocator.budget"] for r in trials} == {"64", "128", "256"}
    assert all("tree.depth" in r.data.params for r in trials)
    done = [r for r in trials if r.data.tags.get("optuna.state") == "COMPLETE"]
    stage_runs = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{done[0].info.run_id}'"
    )
    assert [r.data.tags["mchar.stage"] for r in stage_runs] == ["eval"]
    assert "val/delta_nll" in stage_runs[0].data.metrics  # logged by Lightning through the stage run

    runs_before = len(toy_log(toy))
    again = run_sweep(spec)  # resume of a finished study: nothing re-runs
    assert len(again.trials) == 6 and len(toy_log(toy)) == runs_before
    assert len(client.search_runs([exp.experiment_id], "tags.`mchar.role` = 'study'")) == 1


def test_bad_specs_fail_before_any_trial(toy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mchar.cli import main
    from mchar.errors import MCharError
    from mchar.sweep import run_sweep

    with pytest.raises(MCharError, match="spec file not found"):
        run_sweep(toy / "nope.yaml")
    bad_key = write_spec(toy, "badkey", "allocator.budgte: {type: int, values: [64]}")
    with pytest.raises(MCharError, match="unknown config key 'allocator.budgte'.*allocator.budget"):
        run_sweep(bad_key)
    bad_policy = write_spec(
        toy, "badpolicy", "allocator.policy: {type: categorical, choices: [recency, bogus]}"
    )
    with pytest.raises(MCharError, match=r"search_space.allocator.policy='bogus'.*not one of"):
        run_sweep(bad_policy)
    bad_field = write_spec(toy, "badfield", "tree.depth: {type: int, lo: 1, high: 3}")
    with pytest.raises(MCharError, match="unknown field"):
        run_sweep(bad_field)
    own_names = write_spec(toy, "own", derived='"eval.policies=[{allocator.policy}]", "name=own_t{trial}"')
    with pytest.raises(MCharError, match=r"own.yaml: lensnet.gistnet_dir: no exported GistNet"):
        run_sweep(  # an input every trial shares: checked once, before trial 0
            own_names, extra_overrides=["stages=[lensnet,eval]", f"lensnet.gistnet_dir={toy}/none"]
        )
    # trials that export under one name would overwrite the exports of the experiment they start from
    with pytest.raises(
        MCharError, match=r"toy.yaml: trials train gistnet under one name.*name=toy_t\{trial\}"
    ):
        run_sweep(write_spec(toy), extra_overrides=["stages=[gistnet,eval]"])
    fixed = write_spec(toy, "fixed", derived='"eval.policies=[{allocator.policy}]", "name=x_{tree.depth}"')
    with pytest.raises(MCharError, match=r"fixed.yaml: trials train lensnet under one name"):
        run_sweep(fixed, extra_overrides=["stages=[lensnet,eval]"])  # a placeholder that is not swept
    base_space = "base_lm.lr: {type: float, values: [0.001, 0.003]}"
    with pytest.raises(MCharError, match=r"base with different base_lm.lr under one model.name"):
        run_sweep(write_spec(toy, "bases", base_space), extra_overrides=["stages=[base_lm,eval]"])
    assert not (toy / "optuna.db").exists() and toy_log(toy) == []  # nothing ran, no storage touched

    assert main(["sweep", str(bad_policy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mchar: error: sweep:") and "bogus" in err[0]


def test_config_error_in_one_trial_is_a_fail_not_a_crash(toy: Path) -> None:
    from optuna.trial import TrialState

    from mchar.sweep import run_sweep

    # budget 16 < tree.block_size 32: each value alone composes, only that combination is invalid
    spec = write_spec(
        toy,
        "combo",
        """
      allocator.budget: {type: int, values: [64, 16]}
      tree.block_size: {type: int, values: [8, 32]}
    """,
    )
    spec.write_text(spec.read_text().replace("n_startup_trials: 1", "n_startup_trials: 5"))
    study = run_sweep(spec)
    states = {(t.params["allocator.budget"], t.params["tree.block_size"]): t for t in study.trials}
    assert len(states) == 4
    bad = states.pop((16, 32))
    assert bad.state == TrialState.FAIL and "allocator.budget: 16 is smaller" in bad.user_attrs["fail_reason"]
    assert {t.state for t in states.values()} == {TrialState.COMPLETE}


def gistnet_spec(spec: Path) -> Path:
    spec.write_text(spec.read_text().replace("metric_stage: eval", "metric_stage: gistnet"))
    return spec


def test_keep_files_best_releases_every_other_trials_exports_and_checkpoints(
    toy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mchar.pipeline
    from mchar.errors import MCharError
    from mchar.sweep import run_sweep

    monkeypatch.setitem(mchar.pipeline.STAGE_MODULES, "gistnet", "tests.test_sweep:toy_export_stage")
    with pytest.raises(MCharError, match="keep_files must be one of all, best, got 'some'"):
        run_sweep(write_spec(toy, "typo", extra="keep_files: some\n"))
    derived = '"name=keep_t{trial}"'
    shared = toy / "artifacts" / "gistnet" / "smoke"  # the experiment's own export: never a trial's to delete
    shared.mkdir(parents=True)
    (shared / "model.safetensors").write_bytes(b"keep")
    spec = gistnet_spec(write_spec(toy, "keep", derived=derived, extra="keep_files: best\n"))
    study = run_sweep(spec, extra_overrides=["stages=[gistnet]"])
    states = {t.number: t.state.name for t in study.trials}
    assert len(states) == 6 and {"COMPLETE", "FAIL", "PRUNED"} <= set(states.values()), states
    best = study.best_trial.number
    exports = sorted(p.name for p in (toy / "artifacts" / "gistnet").iterdir())
    assert exports == sorted([f"keep_t{best}", "smoke"])  # pruned, failed and beaten trials' exports are gone
    assert (shared / "model.safetensors").read_bytes() == b"keep"
    for n in states:
        stage = toy / "runs" / f"keep_t{n}" / "sweeps" / "keep" / f"trial-{n}" / "gistnet"
        assert (stage / "summary.json").is_file()  # small files stay with every trial
        assert (stage / "checkpoints").exists() == (n == best) == (stage / "export").exists()

    # the default keeps everything
    spec = gistnet_spec(write_spec(toy, "all", derived='"name=all_t{trial}"'))
    run_sweep(spec, extra_overrides=["stages=[gistnet]"])
    assert len(list((toy / "artifacts" / "gistnet").glob("all_t*"))) == 6


DRIVER = """
import sys
import mchar.pipeline
mchar.pipeline.STAGE_MODULES["eval"] = {toy!r}
from mchar.sweep import run_sweep
run_sweep(sys.argv[1])
"""


@pytest.mark.slow
def test_kill_minus_nine_then_resume(tmp_path: Path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    spec = write_spec(
        tmp_path,
        "killme",
        """
      allocator.budget: {type: int, values: [64, 128, 256]}
      tree.depth: {type: int, values: [1]}
    """,
    )
    spec.write_text(
        spec.read_text().replace("type: median, n_startup_trials: 1, n_warmup_steps: 0", "type: none")
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MCHAR_TOY_LOG": str(tmp_path / "toy.log"),
        "MCHAR_TOY_SLEEP_BUDGET": "128",
    }
    cmd = [sys.executable, "-c", DRIVER.format(toy=TOY), str(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not any(r["budget"] == 128 for r in toy_log(tmp_path)):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.time() < deadline, "trial 1 never started"
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # mid-trial: trial 1 stays RUNNING in storage
    proc.wait()
    first = time.perf_counter() - t0
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.load_study(study_name="killme", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]

    env.pop("MCHAR_TOY_SLEEP_BUDGET")
    t1 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    print(f"killed after {first:.1f}s; resume took {time.perf_counter() - t1:.1f}s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "re-queued interrupted trial(s) [1]" in out.stderr

    study = optuna.load_study(study_name="killme", storage=storage)
    trials = study.trials
    print(out.stderr[-4000:])
    assert trials[1].state == TrialState.FAIL and "interrupted" in trials[1].user_attrs["fail_reason"]
    complete = [t.params["allocator.budget"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == [64, 128, 256]  # every grid point completed exactly once
    assert len(trials) == 4  # 3 grid points + one retry, nothing duplicated
    assert [t.system_attrs.get("failed_trial") for t in trials].count(1) == 1
    runs = [r["budget"] for r in toy_log(tmp_path)]
    assert sorted(runs) == [64, 128, 128, 256]  # the completed trial 0 was not re-run

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("mchar")
    killed = client.search_runs([exp.experiment_id], "tags.`mchar.trial` = '1'")
    assert killed and {r.info.status for r in killed} == {"KILLED"}
    studies = client.search_runs([exp.experiment_id], "tags.`mchar.role` = 'study'")
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"  # the study run was reused


@pytest.mark.parametrize(
    "spec_path", sorted((Path(__file__).parents[1] / "sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_specs_validate(spec_path: Path) -> None:
    from mchar.sweep import load_spec, validate

    spec = load_spec(spec_path)
    validate(spec, [])  # every swept value composes into a valid config, before any trial would run
    assert spec.search_space


def test_a_list_of_metrics_is_averaged_into_one_objective(toy: Path) -> None:
    from mchar.errors import MCharError
    from mchar.sweep import run_sweep

    spec = write_spec(toy, "mean", space="allocator.budget: {type: int, values: [64, 128]}")
    spec.write_text(
        spec.read_text().replace("metric: final/delta_nll", "metric: [final/delta_nll, final/doubled]")
    )
    study = run_sweep(spec)
    assert sorted(t.value for t in study.trials) == pytest.approx([1.5 * toy_value(b, 2) for b in (64, 128)])
    for bad in ("metric: []", "metric: [final/delta_nll, 3]"):
        path = write_spec(toy, "badmetric", space="allocator.budget: {type: int, values: [64]}")
        path.write_text(path.read_text().replace("metric: final/delta_nll", bad))
        with pytest.raises(MCharError, match="`metric` must be a metric key or a non-empty list"):
            run_sweep(path)
    missing = write_spec(toy, "missing", space="allocator.budget: {type: int, values: [64]}")
    missing.write_text(
        missing.read_text().replace("metric: final/delta_nll", "metric: [final/delta_nll, final/nope]")
    )
    study = run_sweep(missing)  # a key no stage logs fails the trial, not the sweep
    assert "final/nope" in study.trials[0].user_attrs["fail_reason"]


def test_overrides_may_follow_the_options(toy: Path) -> None:
    """``sweep SPEC --n-trials N OVERRIDE`` (the README's order) runs N trials with the override applied."""
    from mchar.cli import main

    spec = write_spec(toy, "order", space="allocator.budget: {type: int, values: [64, 128]}")
    assert main(["sweep", str(spec), "--n-trials", "1", "seed=7"]) == 0
    (trial,) = toy_log(toy)
    assert trial["budget"] in (64, 128) and trial["seed"] == 7
    with pytest.raises(SystemExit):
        main(["sweep", str(spec), "--n-trials", "1", "--bogus"])
    assert len(toy_log(toy)) == 1


def test_a_study_is_only_continued_under_the_same_spec(toy: Path) -> None:
    """Changed overrides (other models, documents, ...) must not add trials to a study run under the old ones."""
    from mchar.sweep import SweepError, run_sweep

    spec = write_spec(toy, "same", space="allocator.budget: {type: int, values: [64]}")
    assert len(run_sweep(spec).trials) == 1
    resumed = run_sweep(spec, extra_overrides=["trainer.enable_progress_bar=false"])  # cosmetic: same study
    assert len(resumed.trials) == 1
    with pytest.raises(SweepError, match="was run with other overrides.*optuna delete-study"):
        run_sweep(spec, extra_overrides=["eval.documents=3"])
    spec.write_text(spec.read_text().replace("stages=[eval]", "stages=[eval]\n  - seed=7"))
    with pytest.raises(SweepError, match="new study_name"):
        run_sweep(spec)
    assert len(toy_log(toy)) == 1  # nothing ran under the changed spec


def test_enqueued_points_run_first_and_only_once(toy: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    from mchar.errors import MCharError
    from mchar.sweep import run_sweep

    def spec_with(name: str, enqueue: str, sampler: str = "{type: random, seed: 0}") -> Path:
        path = write_spec(toy, name, "allocator.budget: {type: int, low: 64, high: 256}", enqueue)
        path.write_text(path.read_text().replace("sampler: {type: grid}", f"sampler: {sampler}"))
        return path

    spec = spec_with("enq", "enqueue: [{allocator.budget: 100}]\n")
    study = run_sweep(spec, n_trials=2)
    assert study.trials[0].params == {"allocator.budget": 100}
    assert study.trials[0].value == pytest.approx(toy_value(100, 2))  # smoke: tree.depth 2
    study = run_sweep(spec, n_trials=3)  # continued: the point is not queued again
    assert len(study.trials) == 3
    assert sum("fixed_params" in t.system_attrs for t in study.trials) == 1
    # a reference point is never pruned, even the worst one (median pruning is on from the second trial)
    spec.write_text(
        spec.read_text().replace(
            "{allocator.budget: 100}]", "{allocator.budget: 100}, {allocator.budget: 256}]"
        )
    )
    study = run_sweep(spec, n_trials=4)
    (ref,) = [t for t in study.trials if t.system_attrs.get("fixed_params") == {"allocator.budget": 256}]
    assert ref.state == TrialState.COMPLETE and ref.value == pytest.approx(toy_value(256, 2))
    # a reference pruned before (older code, another pruner) is queued again until it finishes
    pruned = optuna.trial.create_trial(
        state=TrialState.PRUNED,
        params={"allocator.budget": 200},
        distributions={"allocator.budget": optuna.distributions.IntDistribution(64, 256)},
        system_attrs={"fixed_params": {"allocator.budget": 200}},
    )
    study.add_trial(pruned)
    spec.write_text(
        spec.read_text().replace(
            "{allocator.budget: 256}]", "{allocator.budget: 256}, {allocator.budget: 200}]"
        )
    )
    study = run_sweep(spec, n_trials=6)  # the added pruned trial counts as finished
    states = [
        t.state for t in study.trials if t.system_attrs.get("fixed_params") == {"allocator.budget": 200}
    ]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE]
    for name, enqueue, sampler, needle in [
        ("enq_key", "enqueue: [{tree.depth: 2}]\n", None, "'tree.depth' is not a search_space key"),
        ("enq_range", "enqueue: [{allocator.budget: 999}]\n", None, "outside"),
        ("enq_type", "enqueue: [{allocator.budget: 1.5}]\n", None, "not an integer"),
        ("enq_grid", "enqueue: [{allocator.budget: 64}]\n", "{type: grid}", "grid sampler"),
        ("enq_list", "enqueue: {allocator.budget: 64}\n", None, "list of non-empty mappings"),
    ]:
        bad = spec_with(name, enqueue, sampler or "{type: random, seed: 0}")
        if sampler:
            bad.write_text(
                bad.read_text().replace("{type: int, low: 64, high: 256}", "{type: int, values: [64]}")
            )
        with pytest.raises(MCharError, match=needle):
            run_sweep(bad)
    assert {s for s in _study_names(toy)} == {"enq"}  # the bad specs touched no storage


def _study_names(tmp: Path) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp}/optuna.db")]


def test_edits_to_conf_while_a_sweep_runs_change_none_of_its_trials(
    toy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every trial composes from the copy of ``conf/`` taken at start; the copy is logged with the study run, and a
    resumed study whose config groups changed says so."""
    import shutil

    from mlflow.tracking import MlflowClient

    from mchar.compose import compose_config
    from mchar.errors import MCharError
    from mchar.sweep import run_sweep

    conf = toy / "conf"
    shutil.copytree(REPO / "conf", conf)
    monkeypatch.setenv("MCHAR_CONF_DIR", str(conf))
    monkeypatch.setenv("MCHAR_TOY_EDIT_CONF", str(conf))
    spec = write_spec(toy, "frozen", space="allocator.budget: {type: int, values: [64, 128]}")
    study = run_sweep(spec)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert len(toy_log(toy)) == 2
    assert os.environ["MCHAR_CONF_DIR"] == str(conf)
    with pytest.raises(MCharError, match="a_key_the_schema_lacks"):  # the edit was real: composing now fails
        compose_config(["+experiment=smoke"])
    client = MlflowClient(f"sqlite:///{toy}/mlflow.db")
    (study_run,) = client.search_runs(
        [client.get_experiment_by_name("mchar").experiment_id], "tags.`mchar.role` = 'study'"
    )
    (logged,) = [a for a in client.list_artifacts(study_run.info.run_id, "sweep") if a.is_dir]
    snapshot = Path(client.download_artifacts(study_run.info.run_id, logged.path, str(toy / "dl")))
    assert "a_key_the_schema_lacks" not in (snapshot / "lensnet" / "default.yaml").read_text()
    default = conf / "lensnet" / "default.yaml"
    default.write_text(default.read_text().replace("a_key_the_schema_lacks: 1\n", "") + "# a comment\n")
    monkeypatch.delenv("MCHAR_TOY_EDIT_CONF")
    capsys.readouterr()
    run_sweep(spec)  # nothing left to run, but the study's config groups are not the ones it started with
    assert "conf/ changed since this study started" in capsys.readouterr().err
    assert len(toy_log(toy)) == 2
