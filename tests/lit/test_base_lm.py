"""Base-LM training loss: plain next-token NLL by default, answer tokens up-weighted only when asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mchar.base.adapter import tiny_causal_lm
from mchar.lit.base_lm import BaseLMModule


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 18:21] = True
    labels = ids.clone()
    labels[1, 20:] = -100  # padding
    return {"input_ids": ids, "labels": labels, "answer_mask": answer}


def _token_nll(module: BaseLMModule, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = module.model(input_ids=b["input_ids"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    return nll, labels.ne(-100).float()


def test_default_loss_is_hf_causal_lm_loss() -> None:
    torch.manual_seed(0)
    module = BaseLMModule(tiny_causal_lm("llama"), answer_weight=1.0)
    b = _batch()
    ours = module._loss(b["input_ids"], b["labels"], b["answer_mask"])
    theirs = module.model(input_ids=b["input_ids"], labels=b["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("weight", [3.0, 10.0])
def test_answer_tokens_are_weighted(weight: float) -> None:
    torch.manual_seed(0)
    module = BaseLMModule(tiny_causal_lm("llama"), answer_weight=weight)
    b = _batch(1)
    nll, valid = _token_nll(module, b)
    w = valid * (1 + (weight - 1) * b["answer_mask"][:, 1:].float())
    expected = (nll * w).sum() / w.sum()
    assert torch.allclose(module._loss(b["input_ids"], b["labels"], b["answer_mask"]), expected, atol=1e-5)
    plain = (nll * valid).sum() / valid.sum()
    assert not torch.allclose(expected, plain)  # the weight really changes the objective
    # training_step reads the mask from the batch
    assert torch.allclose(module.training_step(b, 0), expected, atol=1e-5)


def test_copy_batch_adds_the_masked_copy_loss_deterministically_per_step() -> None:
    from mchar.data.copy_batches import repeat_batch

    torch.manual_seed(0)
    module = BaseLMModule(tiny_causal_lm("llama"), copy_batch=4, copy_length=32, copy_pool=200, seed=3)
    b = _batch(2)
    text = module._loss(b["input_ids"], b["labels"], b["answer_mask"])
    copy = module.copy_loss(0)
    assert torch.allclose(module.training_step(b, 0), text + copy, atol=1e-5)
    assert torch.equal(module.copy_loss(0), copy) and not torch.equal(module.copy_loss(1), copy)
    # the copy loss is the NLL of exactly the copyable targets of seed/step's batch
    ids, mask = repeat_batch(4, 32, 200, torch.Generator().manual_seed(3 * 1_000_003 + 0))
    logits = module.model(input_ids=ids).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:]
    assert torch.allclose(copy, (nll * m).sum() / m.sum(), atol=1e-5)
    assert torch.allclose(BaseLMModule(module.model).training_step(b, 0), text, atol=1e-5)  # off by default


def test_copy_only_steps_train_the_copy_term_alone_then_text_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = BaseLMModule(
        tiny_causal_lm("llama"), copy_batch=4, copy_length=32, copy_from_step=3, copy_only_steps=2, seed=1
    )
    phases = [module.copy_phase(s) for s in range(7)]
    assert phases == [(False, True)] * 3 + [(True, False)] * 2 + [(True, True)] * 2
    b = _batch(3)
    text = module._loss(b["input_ids"], b["labels"], b["answer_mask"])
    for step, expected in [(0, text), (3, module.copy_loss(3)), (5, text + module.copy_loss(5))]:
        monkeypatch.setattr(BaseLMModule, "global_step", property(lambda self, s=step: s))
        assert torch.allclose(module.training_step(b, 0), expected, atol=1e-5), step


def test_a_trainer_fit_runs_through_the_copy_only_phase_and_back(tmp_path) -> None:
    """Under a real Trainer the logged keys must stay consistent when the text loss switches off and on."""
    import lightning as L

    torch.manual_seed(0)
    module = BaseLMModule(
        tiny_causal_lm("llama"),
        copy_batch=2,
        copy_length=16,
        copy_from_step=2,
        copy_only_steps=2,
        max_steps=6,
    )
    data = torch.utils.data.DataLoader([_batch(i)["input_ids"][0] for i in range(6)], batch_size=1)
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 6
    assert {"train/loss", "train/copy_loss"} <= set(trainer.callback_metrics)
