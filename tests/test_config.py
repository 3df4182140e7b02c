"""Every experiment composes and validates; bad configs fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mchar.compose import available_experiments, compose_config, flatten
from mchar.config import ConfigError


@pytest.mark.parametrize("name", available_experiments())
def test_every_experiment_composes(name: str) -> None:
    cfg = compose_config([f"+experiment={name}"])
    assert cfg.allocator.budget >= cfg.tree.block_size
    assert cfg.stages


def test_experiment_required_files_exist() -> None:
    expected = {
        "smoke",
        "quickstart",
        "base_lm",
        "gistnet",
        "lensnet",
        "e2e",
        "retrieval",
        "heldout_large",
        "tasks_large",
    }
    assert expected <= set(available_experiments())


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["allocator.budget=4"], "allocator.budget"),
        (["allocator.budget=abc"], "allocator.budget"),
        (["tree.depth=0"], "tree.depth"),
        (["tree.block_size=0"], "tree.block_size"),
        (["tree.block_size=1.5"], "tree.block_size"),
        (["tree.bogus=1"], "tree.bogus"),
        (["allocater.budget=5"], "(did you mean allocator.budget"),
        (["trainer.extra.foo=1"], "a new key needs a leading +"),
        (["allocator.policy=nope"], "allocator.policy"),
        (["eval.oracle_documents=0"], "eval.oracle_documents"),
        (["model=hf"], "model.name_or_path"),
        (["+experiment=does_not_exist"], "available: "),
        (["model=nope"], "model"),
        (["data.split=[0.5,0.2]"], "data.split"),
        (["gistnet.pooling=max"], "gistnet.pooling"),
        (["gistnet.session_share=1.5"], "gistnet.session_share"),
        (["allocator.query_recency=-1"], "allocator.query_recency: must be >= 0"),
        (["gistnet.val_keep_raw_blocks=-1"], "gistnet.val_keep_raw_blocks: must be >= 0"),
        (["gistnet.keep_raw_blocks=4", "gistnet.keep_raw_max=2"], "gistnet.keep_raw_max"),
        (["gistnet.upper_weight=-0.5"], "gistnet.upper_weight: must be >= 0"),
        (["gistnet.upper_keep_raw_blocks=-1"], "gistnet.upper_keep_raw_blocks: must be >= 0"),
        (["gistnet.session_edits=-1"], "gistnet.session_edits"),
        (["base_lm.gist_exposure_session_share=2"], "base_lm.gist_exposure_session_share"),
        (["base_lm.gist_exposure_summary=median"], "base_lm.gist_exposure_summary"),
        (["trainer=fsdp", "trainer.accelerator=cpu"], "trainer.strategy=fsdp: Lightning's FSDP needs GPUs"),
        (["trainer.precision=bf16_mixed"], "trainer.precision: 'bf16_mixed' is not one of 32-true"),
        (["base_lm.gist_exposure_summary=gistnet"], "base_lm.gist_exposure_summary=gistnet: needs"),
        (["lensnet.random_fill=1.5"], "lensnet.random_fill"),
        (["lensnet.on_policy=-0.1"], "lensnet.on_policy"),
        (["lensnet.settle_states=1.5"], "lensnet.settle_states: must be in [0, 1]"),
        (
            ["lensnet.settle_states=0.5", "allocator.query_scorer=similarity"],
            "needs allocator.query_scorer=lexical",
        ),
        (["lensnet.query_tokens=-1"], "lensnet.query_tokens"),
        (["lensnet.recency_prior=-0.5"], "lensnet.recency_prior"),
        (["lensnet.lexical_tokens=-1"], "lensnet.lexical_tokens"),
        (["lensnet.lexical_follow=-1"], "lensnet.lexical_follow"),
        (["lensnet.lexical_idf_power=0"], "lensnet.lexical_idf_power"),
        (["lensnet.lexical_max_df=0"], "lensnet.lexical_max_df"),
        (["lensnet.raw_embedding=cls"], "lensnet.raw_embedding"),
        (["allocator.query_follow=-1"], "allocator.query_follow"),
        (["allocator.query_idf_power=0"], "allocator.query_idf_power"),
        (["allocator.query_max_df=0"], "allocator.query_max_df: must be a positive number"),
        (["allocator.query_tau_expand=inf"], "allocator.query_tau_expand: must be a finite number"),
        (["allocator.query_rebuild=fresh"], "allocator.query_rebuild"),
        (["lensnet.lexical_tokens=0"], "lensnet.lexical_prior: needs lensnet.lexical_tokens > 0"),
        (["lensnet.query_tokens=0", "lensnet.similarity_prior=1"], "lensnet.similarity_prior"),
        (["allocator.query_rounds=0"], "allocator.query_rounds"),
        (["allocator.query_cooldown=-1"], "allocator.query_cooldown"),
        (["allocator.query_similarity=-1"], "allocator.query_similarity"),
        (["allocator.query_scorer=bm25"], "allocator.query_scorer"),
        (["allocator.attention_queries=0"], "allocator.attention_queries"),
        (["allocator.attention_layer=99"], "allocator.attention_layer"),
        (["lensnet.alloc_start=middle"], "lensnet.alloc_start"),
        (["lensnet.utility=kl"], "lensnet.utility"),
        (["lensnet.teacher_temperature=0"], "lensnet.teacher_temperature"),
        (["lensnet.teacher_gate=1.5"], "lensnet.teacher_gate"),
        (["lensnet.ema_decay=1.0"], "lensnet.ema_decay: must be null or in (0, 1)"),
        (["gistnet.ema_decay=0"], "gistnet.ema_decay: must be null or in (0, 1)"),
        (["lensnet.pair_norm=pair"], "lensnet.pair_norm"),
        (["lensnet.pair_weight=uniform"], "lensnet.pair_weight"),
        (["lensnet.mix_answer_tail=-1"], "lensnet.mix_answer_tail"),
        (["lensnet.task_mix_fraction=1.0"], "lensnet.task_mix_fraction"),
        (["data.task_mix_fraction=1.0"], "data.task_mix_fraction"),
        (["data.mix_tasks=[passkey,cpy]"], "data.mix_tasks"),
        (["allocator.fill_budget=maybe"], "allocator.fill_budget"),
        (["base_lm.copy_batch=-1"], "base_lm.copy_batch"),
        (["seed=-1"], "seed: must be in [0, 2**32)"),
        (["eval.device=gpu"], "eval.device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
        (["data.split_seed=4294967296"], "data.split_seed"),
        (["data.val_seed=-1"], "data.val_seed"),
        (["gistnet.lr=0"], "gistnet.lr"),
        (["e2e.lr=-1e-4"], "e2e.lr"),
        (["lensnet.max_steps=-1"], "lensnet.max_steps: must be >= 0"),
        (["gistnet.layers=0"], "gistnet.layers"),
        (["lensnet.horizon=0"], "lensnet.horizon"),
        (["lensnet.candidates=1"], "lensnet.candidates: must be >= 2"),
        (["e2e.lora_rank=0"], "e2e.lora_rank"),
        (["base_lm.copy_batch=8", "base_lm.copy_length=4"], "base_lm.copy_batch"),
        (["base_lm.copy_only_steps=100"], "base_lm.copy_only_steps"),
        (["model.local.induction_prior=true"], "model.local.induction_prior"),
        (["model.local.head_dim=7"], "model.local.head_dim"),
        (["base_lm.copy_batch=8", "base_lm.copy_from_step=-1"], "base_lm.copy_only_steps"),
        (["base_lm.curriculum_windows=[128]"], "base_lm.curriculum_steps"),
        (
            ["base_lm.curriculum_windows=[99999]", "base_lm.curriculum_steps=[5]"],
            "base_lm.curriculum_windows",
        ),
    ],
)
def test_bad_config_is_one_clear_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_overrides_reach_flattened_params() -> None:
    cfg = compose_config(["+experiment=smoke", "allocator.budget=96", "tree.depth=3"])
    params = flatten(cfg)
    assert params["allocator.budget"] == "96"
    assert params["tree.depth"] == "3"
    assert params["tree.block_size"] == "8"
    cfg = compose_config(
        ["+experiment=smoke", "allocator.fill_budget=false", "data.mix_tasks=[copy,passkey]"]
    )
    assert cfg.allocator.fill_budget is False and list(cfg.data.mix_tasks) == ["copy", "passkey"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mchar", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_is_light() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for verb in ("fit", "eval", "sweep", "report", "ui", "bench"):
        assert verb in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, mchar.cli; mchar.cli._parser(); print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["fit", "+experiment=nope"], "unknown experiment 'nope' (available:"),
        (["fit", "+experiment=smoke", "allocator.budget=3"], "allocator.budget"),
        (["fit", "+experiment=smoke", "tree.depth=0"], "tree.depth"),
        (["bench", "no-such-bench"], "unknown benchmark"),
    ],
)
def test_cli_bad_input_exits_nonzero_without_traceback(args: list[str], needle: str) -> None:
    out = _cli(*args)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_print_config_shows_resolved_values() -> None:
    out = _cli("fit", "+experiment=smoke", "allocator.budget=80", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "budget: 80" in out.stdout


@pytest.mark.parametrize(
    "override", ["name=../elsewhere", "name=a/b", "model.name=has space", "name=.hidden"]
)
def test_names_that_become_folders_must_be_plain(override: str) -> None:
    with pytest.raises(ConfigError, match=r"must be a plain name"):
        compose_config(["+experiment=smoke", override])


def test_a_broken_yaml_file_under_conf_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", conf)
    group = conf / "lensnet" / "default.yaml"
    group.write_text(group.read_text() + "width: 96\n")  # a key given twice
    monkeypatch.setenv("MCHAR_CONF_DIR", str(conf))
    with pytest.raises(ConfigError) as info:
        compose_config(["+experiment=smoke"])
    message = str(info.value)
    assert "duplicate key" in message and "lensnet/default.yaml" in message and "\n" not in message
