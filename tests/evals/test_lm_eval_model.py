"""The ``mchar`` lm-eval model: requests go through MegaContext sessions; bad requests fail with one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mchar.errors import MCharError
from tests.evals import TEXT, build_tiny_base

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


def _req(*args: object) -> SimpleNamespace:
    return SimpleNamespace(args=args)


def _model(base_dir: Path, **kw: object):  # noqa: ANN202
    from mchar.evals.lm_eval_model import MegaContextLM

    args = {"base": str(base_dir), "policy": "recency", "budget": 64, "block_size": 8, "depth": 2} | kw
    return MegaContextLM(**args)


def test_registered_under_mchar() -> None:
    from lm_eval.api.registry import get_model

    import mchar.evals.lm_eval_model as mod

    assert get_model("mchar") is mod.MegaContextLM


def test_rolling_equals_full_context_when_budget_covers_document(base_dir: Path) -> None:
    from mchar.evals.perplexity import full_context_logprobs

    text = TEXT * 2
    lm = _model(base_dir, budget=512)
    ids = lm.tok_encode(text)
    assert len(ids) + 1 < 512
    got = lm.loglikelihood_rolling([_req(text)])[0]
    ref = full_context_logprobs(lm.components.base, torch.tensor([lm.eot_token_id, *ids]))
    assert got == pytest.approx(float(ref.sum()), abs=1e-3)
    # at a small budget the document is still scored token by token through the session, just differently
    small = _model(base_dir, budget=32, policy="similarity").loglikelihood_rolling([_req(text)])[0]
    assert small < 0 and small != pytest.approx(got, abs=1e-6)


def test_loglikelihood_matches_rolling_pieces(base_dir: Path) -> None:
    lm = _model(base_dir, budget=512)
    ctx, cont = "def add(a, b):", "\n    return a + b"
    ll, greedy = lm.loglikelihood([_req(ctx, cont)])[0]
    assert ll < 0 and isinstance(greedy, bool)
    c_ids, k_ids = lm._encode_pair(ctx, cont)
    from mchar.evals.perplexity import full_context_logprobs

    ref = full_context_logprobs(lm.components.base, torch.tensor(c_ids + k_ids))[len(c_ids) - 1 :]
    assert ll == pytest.approx(float(ref.sum()), abs=1e-3)


def test_generate_until_stops_at_the_until_string(base_dir: Path) -> None:
    lm = _model(base_dir)
    free = lm.generate_until([_req(TEXT, {"until": [], "max_gen_toks": 12})])[0]
    assert len(free) >= 4
    stop = free[2:4]
    got = lm.generate_until([_req(TEXT, {"until": [stop], "max_gen_toks": 12})])[0]
    assert got == free[: free.find(stop)]
    assert stop not in got


def test_simple_evaluate_runs_a_local_task(base_dir: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mchar.evals.make_tasks import ensure_data, task_dir

    hay = tmp_path / "hay.py"
    hay.write_text(TEXT * 40)
    ensure_data(tmp_path / "data", str(base_dir), ["passkey"], [256], n=2, files=[hay])
    tm = TaskManager(
        include_path=str(task_dir()), include_defaults=False, metadata={"data_dir": str(tmp_path / "data")}
    )
    res = lm_eval.simple_evaluate(
        model=_model(base_dir),
        tasks=["mchar_passkey_256", "mchar_passkey_256_ll"],
        task_manager=tm,
        limit=2,
        bootstrap_iters=0,
    )
    assert res is not None
    assert 0.0 <= res["results"]["mchar_passkey_256"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["results"]["mchar_passkey_256_ll"]["acc,none"] <= 1.0


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"policy": "nope"}, "unknown 'nope'"),
        ({"budget": 4}, "smaller than one block"),
        ({"lensnet": ""} | {"policy": "lensnet"}, "no trained LensNet"),
        ({"query_similarity": "-1"}, "query_similarity: must be >= 0"),
        ({"query_scorer": "bm25"}, "query_scorer: must be similarity or lexical"),
    ],
)
def test_bad_model_args_fail_with_one_line(base_dir: Path, kw: dict, needle: str) -> None:
    with pytest.raises(MCharError, match=needle) as err:
        _model(base_dir, **kw)
    assert "\n" not in str(err.value)


def test_requests_beyond_the_base_positions_fail_before_work(tmp_path: Path) -> None:
    from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
    from mchar.data.tokenizer import train_tokenizer
    from mchar.evals.components import SessionSettings, load_components
    from mchar.evals.lm_eval_model import MegaContextLM

    tok = train_tokenizer(tmp_path, texts=[TEXT * 20], vocab_size=300, min_frequency=1)
    gpt2 = FrozenBaseLM(tiny_causal_lm("gpt2", vocab_size=len(tok), hidden_size=32, max_positions=64), tok)
    comp = load_components(gpt2, SessionSettings(budget=32, block_size=8, depth=2, protect_tokens=8))
    long = TEXT * 3
    lm = MegaContextLM(components=comp, policy="recency")
    with pytest.raises(MCharError, match="exceed the base's 64 positions"):
        lm.loglikelihood_rolling([_req(long)])
    full = MegaContextLM(components=comp, policy="full")
    with pytest.raises(MCharError, match="full context"):
        full.loglikelihood([_req(long, " x")])
    assert full.loglikelihood([_req("def f", "(x)")])[0][0] < 0


@pytest.mark.slow
def test_ruler_niah_runs_offline_with_the_local_tokenizer(base_dir: Path) -> None:
    pytest.importorskip("wonderwords")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=True, metadata={"tokenizer": str(base_dir), "max_seq_lengths": [512]})
    res = lm_eval.simple_evaluate(
        model=_model(base_dir, budget=128),
        tasks=["niah_single_1"],
        task_manager=tm,
        limit=1,
        bootstrap_iters=0,
    )
    assert res is not None
    assert 0.0 <= res["results"]["niah_single_1"]["512,none"] <= 1.0


def test_a_lora_adapter_is_applied_through_model_args(base_dir: Path, tmp_path: Path) -> None:
    """``lora=<e2e export dir>``: the session's base is the adapted base (full context scores change); a directory
    without an adapter fails with one line."""
    from mchar.base.adapter import FrozenBaseLM
    from mchar.core.lora import add_lora, save_lora

    adapted = FrozenBaseLM.from_pretrained(base_dir)
    for layer in add_lora(adapted.model, rank=2, alpha=4.0):
        torch.nn.init.normal_(layer.lora_b, std=0.5)
    save_lora(adapted.model, tmp_path, rank=2, alpha=4.0)
    plain = _model(base_dir, budget=512).loglikelihood_rolling([_req(TEXT)])[0]
    lm = _model(base_dir, budget=512, lora=str(tmp_path))
    assert lm.components.sources["lora"] == str(tmp_path)
    assert lm.loglikelihood_rolling([_req(TEXT)])[0] != pytest.approx(plain, abs=1e-3)
    (tmp_path / "lora.json").unlink()
    with pytest.raises(MCharError, match="lora: ") as err:
        _model(base_dir, lora=str(tmp_path))
    assert "\n" not in str(err.value)
