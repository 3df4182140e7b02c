"""The hand-wired induction circuit copies at init, at any distance, and bad architectures are refused."""

from __future__ import annotations

import pytest
import torch

from mchar.base.induction_prior import check_prior, code_size
from mchar.base.local_lm import build_local_lm
from mchar.config import LocalLMConfig


def _cfg(**kw: object) -> LocalLMConfig:
    base = dict(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        vocab_size=4096,
        max_positions=4096,
        rope_theta=1e10,
        head_dim=64,
        induction_prior=True,
    )
    return LocalLMConfig(**(base | kw))


def _copy_accuracy(model: torch.nn.Module, length: int, src: int, dst: int, seg: int = 40) -> float:
    ids = torch.randint(0, 4096, (4, length), generator=torch.Generator().manual_seed(length))
    ids[:, dst : dst + seg] = ids[:, src : src + seg]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # from the second repeated token on, the 2-token match identifies the source position
    return float(
        (logits[:, dst + 1 : dst + seg - 1].argmax(-1) == ids[:, dst + 2 : dst + seg]).float().mean()
    )


@pytest.mark.parametrize(("length", "src", "dst"), [(512, 100, 300), (2048, 30, 1900)])
def test_a_fresh_prior_model_copies_a_repeated_segment_at_any_distance(
    length: int, src: int, dst: int
) -> None:
    model = build_local_lm(_cfg(), 4096, None, 0, 1, seed=0).eval()
    assert _copy_accuracy(model, length, src, dst) >= 0.9
    plain = build_local_lm(_cfg(induction_prior=False), 4096, None, 0, 1, seed=0).eval()
    assert _copy_accuracy(plain, length, src, dst) < 0.05  # the circuit, not the architecture, copies


def test_a_wider_deeper_base_gets_the_circuit_too() -> None:
    model = build_local_lm(_cfg(hidden_size=256, num_layers=4, head_dim=0), 4096, None, 0, 1, seed=0).eval()
    assert _copy_accuracy(model, 1024, 50, 900) >= 0.9


def test_previous_token_heads_attend_one_and_two_back() -> None:
    model = build_local_lm(_cfg(), 4096, None, 0, 1, seed=0).eval()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions[0][0]
    pos = torch.arange(8, 64)
    assert torch.equal(att[0, pos].argmax(-1), pos - 1)
    assert torch.equal(att[1, pos].argmax(-1), pos - 2)


def test_architectures_without_slow_rope_pairs_are_refused() -> None:
    assert check_prior(128, 4, 2, 64, 1e10, 4096) is None
    assert code_size(64, 1e10, 4096) >= 8
    assert "rope_theta" in check_prior(128, 4, 2, 32, 1e4, 4096)
    assert "2 layers" in check_prior(128, 4, 1, 64, 1e10, 4096)
    with pytest.raises(ValueError, match="induction prior"):
        build_local_lm(_cfg(rope_theta=1e4, head_dim=32), 4096, None, 0, 1)
