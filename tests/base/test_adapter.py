"""The frozen-base adapter on tiny random Llama, Qwen2 and GPT-2 models round-tripped through disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mchar.base.adapter import BaseModelError, FrozenBaseLM, tiny_causal_lm
from mchar.core.protocols import BaseLM

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param)
    tiny_causal_lm(request.param, max_positions=64).save_pretrained(path)
    return request.param, path


def test_from_pretrained_directory_is_frozen_and_exact(saved: tuple[str, Path]) -> None:
    family, path = saved
    base = FrozenBaseLM.from_pretrained(path)
    assert isinstance(base, BaseLM)
    assert not any(p.requires_grad for p in base.parameters())
    base.train()
    assert not base.model.training
    assert base.hidden_size == 32 and base.vocab_size == 256 and base.max_positions == 64
    assert base.embed_scale == 1.0 and base.embedding_rms > 0
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = base.forward_ids(ids)
    logits, cache = base.forward_embeds(base.embed(ids), torch.arange(24).expand(2, -1))
    assert cache is None
    torch.testing.assert_close(logits, reference)
    kept, _ = base.forward_embeds(base.embed(ids), torch.arange(24).expand(2, -1), logits_to_keep=5)
    assert kept.shape[1] == 5  # only the LM-head rows a horizon needs, equal to the full forward's last rows
    torch.testing.assert_close(kept, reference[:, -5:])
    # The saved weights equal the in-memory ones: a second load gives identical logits.
    again = FrozenBaseLM.from_pretrained(path)
    torch.testing.assert_close(again.forward_ids(ids), reference)


def test_kv_cache_continuation_matches_full_forward(saved: tuple[str, Path]) -> None:
    _, path = saved
    base = FrozenBaseLM.from_pretrained(path)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    emb, pos = base.embed(ids), torch.arange(20)[None]
    first, cache = base.forward_embeds(emb[:, :13], pos[:, :13], use_cache=True)
    rest, _ = base.forward_embeds(emb[:, 13:], pos[:, 13:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), base.forward_ids(ids), atol=1e-5, rtol=1e-4)


def test_custom_positions_change_rotary_models(saved: tuple[str, Path]) -> None:
    family, path = saved
    base = FrozenBaseLM.from_pretrained(path)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    a, _ = base.forward_embeds(base.embed(ids), torch.arange(8)[None])
    b, _ = base.forward_embeds(base.embed(ids), (torch.arange(8) * 3)[None])
    assert not torch.allclose(a, b)


def test_attention_received_is_a_distribution_and_leaves_the_attention_kernel_as_it_was(
    saved: tuple[str, Path],
) -> None:
    _, path = saved
    base = FrozenBaseLM.from_pretrained(path)
    kernel = base.model.config._attn_implementation
    emb = base.embed(torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)))
    pos = torch.arange(12).expand(2, -1)
    before, _ = base.forward_embeds(emb, pos)
    for layer in (None, -1, 0):
        mass = base.attention_received(emb, pos, queries=3, layer=layer)
        # every query row is a softmax over the keys, so the mean over rows, heads and layers sums to one
        assert mass.shape == (2, 12) and (mass >= 0).all()
        assert torch.allclose(mass.sum(-1), torch.ones(2), atol=1e-5)
    assert base.model.config._attn_implementation == kernel
    assert torch.equal(base.forward_embeds(emb, pos)[0], before)
    with pytest.raises(BaseModelError, match="attention layer 5 is out of range for a 2-layer base"):
        base.attention_received(emb, pos, queries=3, layer=5)


def test_gpt2_positions_beyond_table_are_refused(tmp_path: Path) -> None:
    tiny_causal_lm("gpt2", max_positions=16).save_pretrained(tmp_path)
    base = FrozenBaseLM.from_pretrained(tmp_path)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(BaseModelError, match="16 learned positions"):
        base.forward_embeds(base.embed(ids), torch.tensor([[0, 1, 2, 40]]))


def test_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError) as info:
        FrozenBaseLM.from_pretrained(tmp_path / "nothing-here")
    assert "model.name_or_path: no directory" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()  # a directory without a model: the loader's own first line
    with pytest.raises(BaseModelError, match="model.name_or_path: cannot load") as info:
        FrozenBaseLM.from_pretrained(tmp_path / "empty")
    assert "\n" not in str(info.value)


def test_remote_code_stays_off_by_default() -> None:
    import inspect

    assert inspect.signature(FrozenBaseLM.from_pretrained).parameters["trust_remote_code"].default is False


def test_loading_draws_no_weights_bar_and_leaves_the_setting_as_it_was(
    saved: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    _, path = saved
    assert hf_logging.is_progress_bar_enabled()
    FrozenBaseLM.from_pretrained(path)
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        FrozenBaseLM.from_pretrained(path)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
