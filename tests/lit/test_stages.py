"""gistnet + lensnet stages end to end through the pipeline, into a real SQLite MLflow store."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from mchar.compose import compose_config
from mchar.pipeline import run_pipeline


def _small_smoke(tmp: Path, runs: str, *overrides: str) -> list[str]:
    """The smoke experiment cut to seconds, writing runs under ``tmp/runs`` and exports under ``tmp/art``."""
    return [
        "+experiment=smoke",
        f"run_dir={tmp / runs}",
        f"artifacts_dir={tmp / 'art'}",
        "base_lm.max_steps=5",
        "base_lm.task_eval_examples=1",
        "data.max_files=20",
        "trainer.enable_progress_bar=false",
        "data.batch_size=2",
        *overrides,
    ]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = compose_config(
        _small_smoke(
            tmp,
            "runs",
            "stages=[base_lm,gistnet,lensnet]",
            "gistnet.max_steps=6",
            "gistnet.val_every=4",
            "lensnet.max_steps=4",
            "lensnet.val_every=2",
        )
    )
    return tmp, run_pipeline(cfg)


def test_stages_export_and_log_to_mlflow(smoke_run) -> None:
    from mlflow.tracking import MlflowClient

    tmp, ctx = smoke_run
    g, lens = ctx.results["gistnet"], ctx.results["lensnet"]
    assert (Path(g["artifact_dir"]) / "model.safetensors").exists()
    assert (Path(lens["artifact_dir"]) / "config.json").exists()
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    runs = {r.data.tags.get("mchar.stage"): r for r in client.search_runs([exp.experiment_id])}
    gm, lm = runs["gistnet"].data.metrics, runs["lensnet"].data.metrics
    for key in ("final/dnll", "final/drop_dnll", "final/dnll_lod1", "final/dnll_lod2", "final/subst_rate"):
        assert key in gm, key
    for key in (
        "final/spearman",
        "final/alloc_nll/lensnet",
        "final/alloc_nll/recency",
        "final/alloc_gain/recency",
    ):
        assert key in lm, key
    assert "train/loss" in gm and runs["gistnet"].data.tags["mchar.gistnet_dir"] == g["artifact_dir"]
    assert runs["gistnet"].info.status == "FINISHED" and runs["lensnet"].info.status == "FINISHED"
    # what validation read (the smoke asks GistNet for 8 + 4 held-out windows, LensNet for 4 + 2)
    for stage, code, retrieval in (("gistnet", 8, 4), ("lensnet", 4, 2)):
        tags = runs[stage].data.tags
        assert 1 <= int(tags["mchar.val_windows"]) <= code
        assert 1 <= int(tags["mchar.val_retrieval_windows"]) <= retrieval


def test_fewer_held_out_windows_than_requested_are_warned(
    smoke_run, caplog: pytest.LogCaptureFixture
) -> None:
    from mchar.stages.gistnet import load_base, load_windows, retrieval_windows

    _, ctx = smoke_run
    base = load_base(ctx)
    with caplog.at_level("WARNING", logger="mchar.stages.gistnet"):
        _, val = load_windows(ctx, base, 10_000)
        rv = retrieval_windows(ctx, base.tokenizer, 10_000)
    said = caplog.text
    assert f"held-out code windows: 10000 requested, the held-out files hold {val.shape[0]} complete" in said
    assert f"held-out retrieval windows: 10000 requested, the val files give {rv.shape[0]} of" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="mchar.stages.gistnet"):
        load_windows(ctx, base, 1)
        retrieval_windows(ctx, base.tokenizer, 1)
    assert "requested" not in caplog.text


def test_val_every_logs_a_trend_on_both_validation_sets(smoke_run) -> None:
    """Validation before step 1, every ``val_every`` steps and at the end; the last point is the final metric."""
    from mlflow.tracking import MlflowClient

    tmp, _ = smoke_run
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    runs = {r.data.tags.get("mchar.stage"): r for r in client.search_runs([exp.experiment_id])}
    for stage, metric, steps in (("gistnet", "dnll_lod1", [0, 4, 6]), ("lensnet", "spearman", [0, 2, 4])):
        run = runs[stage]
        for vset, final in (("val", "final"), ("val_retrieval", "final_retrieval")):
            hist = sorted(
                client.get_metric_history(run.info.run_id, f"{vset}/{metric}"), key=lambda h: h.step
            )
            assert [h.step for h in hist] == steps, (stage, vset, [h.step for h in hist])
            assert hist[-1].value == pytest.approx(run.data.metrics[f"{final}/{metric}"])
    gist = sorted(
        client.get_metric_history(runs["gistnet"].info.run_id, "val/dnll_lod1"), key=lambda h: h.step
    )
    assert gist[0].value != gist[-1].value, "training must move the metric between the first and last point"


def test_a_built_base_with_another_architecture_is_refused_not_reused(smoke_run) -> None:
    from mchar.config import ConfigError
    from mchar.pipeline import RunContext
    from mchar.stages.base_lm import ensure_base_lm

    tmp, ctx = smoke_run
    built = ensure_base_lm(ctx)  # same config: reused, no error
    hidden = ctx.cfg.model.local.hidden_size
    cfg = compose_config(
        [
            "+experiment=smoke",
            f"artifacts_dir={tmp / 'art'}",
            "data.max_files=20",  # the base's split: only the architecture differs
            f"model.local.hidden_size={2 * hidden}",
        ]
    )
    other = RunContext(cfg=cfg, tracker=None, run_dir=tmp / "runs", artifacts_dir=tmp / "art")
    with pytest.raises(
        ConfigError, match=rf"model.name: .* hidden_size={hidden} .* hidden_size={2 * hidden}"
    ):
        ensure_base_lm(other)
    assert (built / "model.safetensors").is_file()  # nothing stored was touched


def test_the_corpus_split_follows_split_seed_not_the_training_seed(smoke_run) -> None:
    """Seed replicates on a reused base keep its held-out files held out; a split that holds out a file the base
    trained on is refused, not reused."""
    from mchar.base.local_lm import READY_MARKER
    from mchar.config import ConfigError
    from mchar.pipeline import RunContext
    from mchar.stages.base_lm import corpus_splits, ensure_base_lm, relpaths

    tmp, ctx = smoke_run

    def context(*extra: str) -> RunContext:
        cfg = compose_config(
            ["+experiment=smoke", f"artifacts_dir={tmp / 'art'}", "data.max_files=20", *extra]
        )
        return RunContext(cfg=cfg, tracker=None, run_dir=tmp / "runs", artifacts_dir=tmp / "art")

    built = ensure_base_lm(ctx)
    replicate = context("seed=7")
    assert corpus_splits(replicate).as_dict() == corpus_splits(ctx).as_dict()
    assert ensure_base_lm(replicate) == built  # same split: reused
    other = context("data.split_seed=7")
    assert corpus_splits(other)["test"] != corpus_splits(ctx)["test"]
    # the base trained on 20 files' train split only; another split whose held-out files avoid them can reuse it
    trained = set(json.loads((built / READY_MARKER).read_text())["train_relpaths"])
    assert trained == set(relpaths(corpus_splits(ctx), ("train",)))
    assert not trained & set(relpaths(corpus_splits(other), ("val", "test")))
    assert ensure_base_lm(other) == built
    # more files under the same split (side nets on more of the corpus): the base's held-out files stay held out
    bigger = context("data.max_files=40")
    assert set(relpaths(corpus_splits(bigger), ("test",))) > set(relpaths(corpus_splits(ctx), ("test",)))
    assert ensure_base_lm(bigger) == built
    marker = built / READY_MARKER
    saved = marker.read_text()
    try:  # a base that did train on one of a config's held-out files is refused, naming it
        leaked = relpaths(corpus_splits(other), ("test",))[0]
        info = json.loads(saved)
        marker.write_text(json.dumps(info | {"train_relpaths": [*info["train_relpaths"], leaked]}))
        with pytest.raises(
            ConfigError,
            match=rf"^data.split_seed: .* trained on 1 of this config's held-out files \(e.g. {re.escape(leaked)}\)",
        ):
            ensure_base_lm(other)
        assert ensure_base_lm(replicate) == built
        # a base recorded before its training files were: only the very same split reuses it
        marker.write_text(json.dumps({k: v for k, v in info.items() if k != "train_relpaths"}))
        assert ensure_base_lm(replicate) == built
        with pytest.raises(ConfigError, match=r"^data.split_seed: .* another train/val/test split"):
            ensure_base_lm(bigger)
    finally:
        marker.write_text(saved)
    assert (built / "model.safetensors").is_file()


def test_a_stage_trains_the_same_net_whatever_ran_before_it(smoke_run) -> None:
    """GistNet after a base trained in the same process == GistNet alone on the reused base (every stage starts from
    the seed): `stages=[gistnet,...]`, a sweep trial and the full quickstart give the same nets."""
    from safetensors.torch import load_file

    tmp, ctx = smoke_run
    cfg = compose_config(
        _small_smoke(
            tmp,
            "runs_again",
            "stages=[base_lm,gistnet]",  # base_lm is reused from disk: it consumes no randomness this time
            "gistnet.max_steps=6",
            "gistnet.val_every=4",
        )
    )
    again = run_pipeline(cfg)
    first = load_file(Path(ctx.results["gistnet"]["export_dir"]) / "model.safetensors")
    second = load_file(Path(again.results["gistnet"]["export_dir"]) / "model.safetensors")
    assert again.results["base_lm"]["trained"] is False
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_e2e_starts_from_another_experiments_nets_and_eval_applies_its_lora(smoke_run) -> None:
    """``stages=[e2e,eval] e2e.init_from=NAME e2e.lora=true`` under a new name: it starts from NAME's exports without
    touching them, exports GistNet + LensNet + the adapter, and the evaluation loads all three together."""
    import json

    from mchar.config import ConfigError

    tmp, ctx = smoke_run

    def cfg(*extra: str):  # noqa: ANN202
        return compose_config(
            [
                "+experiment=smoke",
                "name=smoke_e2e",
                f"run_dir={tmp / 'runs_e2e'}",
                f"artifacts_dir={tmp / 'art'}",
                "data.max_files=20",
                "data.batch_size=2",
                "trainer.enable_progress_bar=false",
                *extra,
            ]
        )

    with pytest.raises(ConfigError, match=r"^e2e.init_from: no GistNet export at .*nowhere"):
        run_pipeline(cfg("stages=[e2e]", "e2e.init_from=nowhere"))
    source = Path(ctx.results["gistnet"]["artifact_dir"])
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    run = run_pipeline(
        cfg(
            "stages=[e2e,eval]",
            f"e2e.init_from={ctx.cfg.name}",
            "e2e.lora=true",
            "e2e.max_steps=2",
            "eval.policies=[recency,lensnet]",
            "eval.tasks=[]",
            "eval.documents=1",
        )
    )
    export = Path(run.results["e2e"]["artifact_dir"])
    assert export == tmp / "art" / "e2e" / "smoke_e2e"
    assert run.results["e2e"]["started_from"] == {
        "gistnet": str(source),
        "lensnet": str(tmp / "art" / "lensnet" / ctx.cfg.name),
    }
    assert {p.name for p in export.iterdir()} >= {"gistnet", "lensnet", "lora.safetensors", "lora.json"}
    components = json.loads(Path(run.results["eval"]["results_path"]).read_text())["components"]
    assert components["lora"] and Path(components["gistnet"]).parent == Path(components["lora"])
    assert Path(components["lensnet"]).parent == Path(components["lora"])
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # what it started from is untouched


def test_a_base_finished_elsewhere_meanwhile_is_kept_not_replaced(tmp_path: Path) -> None:
    """Two processes building one base (sweep workers on a fresh machine): each writes its own directory, and the
    one that finishes second keeps the first's complete base instead of deleting it under its readers."""
    from mchar.base.local_lm import READY_MARKER
    from mchar.stages.base_lm import publish_build

    target = tmp_path / "lm"

    def build(name: str, marker: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / READY_MARKER).write_text(marker)
        return d

    assert publish_build(build("lm.tmp-1", "first"), target)
    assert not publish_build(build("lm.tmp-2", "second"), target)
    assert (target / READY_MARKER).read_text() == "first" and not (tmp_path / "lm.tmp-2").exists()
    unfinished = tmp_path / "other"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")  # a leftover without the ready marker is replaced
    assert publish_build(build("other.tmp-3", "third"), unfinished)
    assert (unfinished / READY_MARKER).read_text() == "third" and not (unfinished / "config.json").exists()


def test_build_directories_of_dead_processes_are_removed_and_a_failed_build_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill -9 cannot clean up after itself, so the next build on the host removes what dead builds left; live
    builds, other hosts' builds (shared filesystems) and other bases' builds stay. A build that raises removes its own
    directory."""
    import os
    import socket
    import subprocess
    import sys

    from mchar.stages import base_lm

    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    target = tmp_path / "lm"
    names = {
        "dead": f"lm.tmp-{host}-{dead_pid}",
        "live": f"lm.tmp-{host}-{os.getpid()}",
        "other_host": f"lm.tmp-elsewhere.example-{dead_pid}",
        "other_base": f"lm2.tmp-{host}-{dead_pid}",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text("{}")
    assert base_lm.remove_dead_builds(target) == [tmp_path / names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")

    def failing_build(ctx, run_id, target, tmp):  # noqa: ANN001, ANN202 - stands in for the real build
        (tmp / "half-written.safetensors").write_bytes(b"\0")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(base_lm, "_build", failing_build)
    with pytest.raises(RuntimeError, match="out of memory"):
        base_lm._train(None, None, target)  # type: ignore[arg-type]
    assert not base_lm.build_dir(target).exists() and not target.exists()


def test_lensnet_can_train_on_its_own_data_mix(smoke_run) -> None:
    """``lensnet.task_mix_fraction``: LensNet's training windows follow its own share of retrieval episodes (0 =
    natural code windows only) while the base's mix and both held-out sets stay as they were."""
    from mchar.pipeline import RunContext
    from mchar.stages.gistnet import load_base
    from mchar.stages.lensnet import lensnet_windows

    tmp, ctx = smoke_run

    def windows(*overrides: str) -> tuple[torch.Tensor, ...]:
        cfg = compose_config(["+experiment=smoke", "data.max_files=20", "data.batch_size=2", *overrides])
        run = RunContext(cfg=cfg, tracker=None, run_dir=tmp / "runs", artifacts_dir=tmp / "art")
        return lensnet_windows(run, load_base(run))

    default, code_only = windows(), windows("lensnet.task_mix_fraction=0.0")
    assert ctx.cfg.data.task_mix_fraction > 0 and default[0].shape[0] > code_only[0].shape[0] > 0
    assert torch.equal(default[1], code_only[1]) and torch.equal(default[2], code_only[2])


def test_lensnet_can_train_over_another_runs_gistnet(smoke_run) -> None:
    """``lensnet.gistnet_dir``: LensNet ablations under their own names reuse one exported GistNet; a directory
    without one stops in one line."""
    from mchar.config import ConfigError
    from mchar.pipeline import RunContext
    from mchar.stages.lensnet import gistnet_dir

    tmp, ctx = smoke_run
    export = ctx.results["gistnet"]["artifact_dir"]

    def context(where: str) -> RunContext:
        cfg = compose_config(["+experiment=smoke", "name=ablation", f"lensnet.gistnet_dir={where}"])
        return RunContext(cfg=cfg, tracker=None, run_dir=tmp / "runs", artifacts_dir=tmp / "art")

    assert gistnet_dir(context(export)) == Path(export)
    with pytest.raises(ConfigError, match=r"^lensnet.gistnet_dir: no exported GistNet at .*nowhere"):
        gistnet_dir(context(str(tmp / "nowhere")))


def test_lensnet_ema_exports_the_average_of_its_weights(smoke_run) -> None:
    """``lensnet.ema_decay`` (0.8 in the smoke): the same LensNet fit (seed, GistNet, data) without it exports other weights
    (the last step's), and each run records its setting."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    tmp, ctx = smoke_run
    cfg = compose_config(
        _small_smoke(
            tmp,
            "runs",
            "name=no_ema",
            "stages=[lensnet]",
            f"lensnet.gistnet_dir={ctx.results['gistnet']['artifact_dir']}",
            "lensnet.max_steps=4",
            "lensnet.val_every=2",
            "lensnet.ema_decay=null",
        )
    )
    no_ema = run_pipeline(cfg)
    averaged = load_file(Path(ctx.results["lensnet"]["export_dir"]) / "model.safetensors")
    last = load_file(Path(no_ema.results["lensnet"]["export_dir"]) / "model.safetensors")
    assert last.keys() == averaged.keys()
    assert any(not torch.equal(last[k], averaged[k]) for k in last)
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mchar").experiment_id
    for name, decay in (("smoke", "0.8"), ("no_ema", "None")):
        (run,) = client.search_runs([experiment], f"attributes.run_name = '{name}/lensnet'")
        assert run.data.params["lensnet.ema_decay"] == decay


def test_lensnet_ema_steps_aside_under_fsdp_with_a_warning() -> None:
    """Each FSDP rank holds a shard of LensNet, so the default average is left out (warned), not refused."""
    from mchar.lit.ema import SubmoduleEMA, ema_callbacks

    assert ema_callbacks("lensnet", None, "auto") == []
    (ema,) = ema_callbacks("lensnet", 0.99, "ddp")
    assert isinstance(ema, SubmoduleEMA) and (ema.attr, ema.decay) == ("lensnet", 0.99)
    with pytest.warns(UserWarning, match="lensnet.ema_decay: no weight average under an FSDP strategy"):
        assert ema_callbacks("lensnet", 0.99, "fsdp") == []


def test_a_fit_too_short_for_its_ema_decay_is_warned() -> None:
    """The average starts at the first step's weights, which keep ``decay ** (steps - 1)`` of it: at 0.99 a 50-step
    fit would export 61 % near-initial weights (warned); the quickstart's 400 steps keep 2 % (silent)."""
    import warnings

    from mchar.lit.ema import ema_callbacks

    with pytest.warns(
        UserWarning, match=r"lensnet.ema_decay=0.99: after 50 steps .* still hold 61% .* ~100 steps"
    ):
        assert len(ema_callbacks("lensnet", 0.99, "auto", steps=50)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for decay, steps in ((0.99, 400), (0.8, 20), (0.99, None)):  # the quickstart's, the smoke's, unknown
            assert len(ema_callbacks("lensnet", decay, "auto", steps=steps)) == 1


def test_the_gpu_trainers_bf16_mixed_precision_trains_every_side_net_on_the_cpu_too(smoke_run) -> None:
    """``trainer=gpu``/``ddp``/``fsdp`` train in ``bf16-mixed``; CI has no GPU, so the autocast paths (GistNet,
    LensNet's utilities and loss, e2e with a LoRA adapter) run here under Lightning's CPU bf16 autocast: every fit
    finishes with finite metrics, records its precision, and exports fp32 master weights that moved in training."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    tmp, _ = smoke_run
    cfg = compose_config(
        [
            "+experiment=smoke",
            "name=smoke_bf16",
            f"run_dir={tmp / 'runs_bf16'}",
            f"artifacts_dir={tmp / 'art'}",
            "stages=[gistnet,lensnet,e2e]",
            "trainer.precision=bf16-mixed",
            "data.max_files=20",
            "data.batch_size=2",
            "trainer.enable_progress_bar=false",
            "gistnet.max_steps=3",
            "lensnet.max_steps=3",
            "e2e.lora=true",
            "e2e.max_steps=2",
        ]
    )
    run = run_pipeline(cfg)
    client = MlflowClient(f"sqlite:///{tmp / 'runs_bf16' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    runs = {r.data.tags.get("mchar.stage"): r for r in client.search_runs([exp.experiment_id])}
    for stage in ("gistnet", "lensnet", "e2e"):
        r = runs[stage]
        assert r.info.status == "FINISHED" and r.data.params["trainer.precision"] == "bf16-mixed", stage
        finals = {k: v for k, v in r.data.metrics.items() if k.startswith("final/")}
        assert finals and all(v == v and abs(v) != float("inf") for v in finals.values()), (stage, finals)
    # e2e started from this run's GistNet export: its bf16 steps moved the fp32 master weights
    assert run.results["e2e"]["started_from"]["gistnet"] == run.results["gistnet"]["artifact_dir"]
    before = load_file(Path(run.results["gistnet"]["artifact_dir"]) / "model.safetensors")
    after = load_file(Path(run.results["e2e"]["artifact_dir"]) / "gistnet" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(
        t.dtype == torch.float32 and torch.isfinite(t).all() for t in [*before.values(), *after.values()]
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lora = load_file(Path(run.results["e2e"]["artifact_dir"]) / "lora.safetensors")
    assert lora and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())


def test_gistnet_can_start_from_the_gistnet_its_base_learnt_to_read(smoke_run, tmp_path: Path) -> None:
    """``base_lm.gist_exposure_summary=gistnet`` trains a GistNet with the base and saves it beside the base;
    ``gistnet.init_from_base`` starts the GistNet stage from it. Without one to start from, the preflight stops."""
    from safetensors.torch import load_file

    from mchar.base.adapter import FrozenBaseLM
    from mchar.config import ConfigError
    from mchar.pipeline import RunContext, preflight
    from mchar.stages.gistnet import build_gistnet, exposure_gistnet_dir

    tmp, ctx = smoke_run

    def cfg(*extra: str):  # noqa: ANN202
        return compose_config(
            [
                "+experiment=smoke",
                "gistnet.residual_mean=true",
                "gistnet.init_from_base=true",
                "data.max_files=20",
                "data.batch_size=2",
                "trainer.enable_progress_bar=false",
                *extra,
            ]
        )

    mean_base = (f"artifacts_dir={tmp / 'art'}", f"model.name={ctx.cfg.model.name}")
    with pytest.raises(ConfigError, match=r"^gistnet.init_from_base: the base at .* was trained without one"):
        preflight(cfg(*mean_base))
    with pytest.raises(ConfigError, match=r"^gistnet.init_from_base: the base \w+ is not built yet"):
        preflight(cfg(f"artifacts_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"^gistnet.init_from_base: only mchar's own local base"):
        preflight(cfg("model=hf", f"model.name_or_path={tmp_path}"))

    built = cfg(
        f"artifacts_dir={tmp_path / 'art'}",
        f"run_dir={tmp_path / 'runs'}",
        "model.name=exposed_lm",
        "base_lm.gist_exposure=1.0",
        "base_lm.gist_exposure_summary=gistnet",
        "base_lm.curriculum_steps=[2]",
        "base_lm.max_steps=2",
        "base_lm.task_eval_examples=1",
        "stages=[base_lm]",
    )
    base_dir = Path(run_pipeline(built).results["base_lm"]["model_dir"])
    saved = load_file(exposure_gistnet_dir(base_dir) / "model.safetensors")
    head = [k for k in saved if k.startswith("nets.0.head.") and k.endswith("weight")][-1]
    assert saved[head].abs().sum() > 0  # the residual head starts at zero: it trained with the base
    preflight(built)  # the built base now has one
    run = RunContext(cfg=built, tracker=None, run_dir=tmp_path / "runs", artifacts_dir=tmp_path / "art")
    net = build_gistnet(run, FrozenBaseLM.from_pretrained(base_dir))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    other = dataclasses.replace(run.cfg, gistnet=dataclasses.replace(run.cfg.gistnet, width=64))
    wider = RunContext(cfg=other, tracker=None, run_dir=tmp_path / "runs", artifacts_dir=tmp_path / "art")
    with pytest.raises(
        ConfigError, match=r"^gistnet.init_from_base: .* differs in width \(32 vs gistnet.\* 64\)"
    ):
        build_gistnet(wider, FrozenBaseLM.from_pretrained(base_dir))
