"""The GPU path (``trainer=gpu``: bf16-mixed Lightning fits, the evaluation on CUDA), run wherever a GPU is.

Skipped on CPU-only machines (CI); ``pytest -m gpu`` runs only these. What they check is what a CPU run cannot:
every stage of the smoke pipeline (e2e with a LoRA adapter included) trains and evaluates on the GPU, a session on
the GPU scores like one on the CPU, every stage from scratch under DDP over two GPUs logs once, and side nets
trained under FSDP export whole weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_smoke_pipeline_trains_and_evaluates_on_the_gpu(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mchar.compose import compose_config
    from mchar.pipeline import run_pipeline

    cfg = compose_config(
        [
            "+experiment=smoke",
            "trainer=gpu",
            f"run_dir={tmp_path / 'runs'}",
            f"artifacts_dir={tmp_path / 'artifacts'}",
            "trainer.enable_progress_bar=false",
        ]
    )
    ctx = run_pipeline(cfg)
    for stage, key in (
        ("base_lm", "final/val_ppl"),
        ("gistnet", "final/dnll"),
        ("lensnet", "final/lens_loss"),
    ):
        assert math.isfinite(ctx.results[stage]["metrics"][key]), (stage, ctx.results[stage]["metrics"])
    export = Path(ctx.results["gistnet"]["artifact_dir"])
    assert all(t.device.type == "cpu" for t in load_file(str(export / "model.safetensors")).values())
    res = json.loads(Path(ctx.results["eval"]["results_path"]).read_text())
    assert res["components"]["device"].startswith("cuda")
    for policy in ("recency", "lensnet"):
        assert math.isfinite(res["policies"][policy]["delta_nll"]), policy

    # end-to-end with a LoRA adapter on the GPU base, from the nets just trained, then evaluated with its adapter
    e2e = compose_config(
        [
            "+experiment=smoke",
            "trainer=gpu",
            "name=smoke_e2e",
            "stages=[e2e,eval]",
            "e2e.init_from=smoke",
            "e2e.lora=true",
            "e2e.max_steps=2",
            f"run_dir={tmp_path / 'runs'}",
            f"artifacts_dir={tmp_path / 'artifacts'}",
            "trainer.enable_progress_bar=false",
        ]
    )
    res = json.loads(Path(run_pipeline(e2e).results["eval"]["results_path"]).read_text())
    assert res["components"]["device"].startswith("cuda") and res["components"]["lora"]
    assert math.isfinite(res["policies"]["lensnet"]["delta_nll"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_every_stage_under_ddp_on_two_gpus_logs_once(tmp_path: Path) -> None:
    """``trainer=ddp`` on two GPUs (NCCL), from scratch: base, GistNet, LensNet and e2e with LoRA (each stage waits
    for rank zero's export, held-out sets split between the ranks, the metric syncs on CUDA), one stage run and one
    export each, the evaluation on rank zero only."""
    from mlflow.tracking import MlflowClient

    from tests.lit.test_ddp import _fit

    _fit(
        tmp_path,
        "stages=[base_lm,gistnet,lensnet,e2e,eval]",
        "trainer=ddp",
        "trainer.devices=2",
        "lensnet.max_steps=4",
        "e2e.max_steps=4",
        "e2e.lora=true",
        "eval.policies=[recency,lensnet]",
        timeout=600,
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mchar")
    stages = [r.data.tags.get("mchar.stage") for r in client.search_runs([exp.experiment_id])]
    assert sorted(s for s in stages if s) == ["base_lm", "e2e", "eval", "gistnet", "lensnet"]
    for export in (
        "gistnet/smoke/model.safetensors",
        "lensnet/smoke/model.safetensors",
        "e2e/smoke/lora.safetensors",
    ):
        assert (tmp_path / "art" / export).exists(), export


def test_side_nets_under_fsdp_export_whole_weights(tmp_path: Path) -> None:
    """``trainer=fsdp`` (bf16-mixed) on the GPUs there are (one or two): GistNet, LensNet and e2e with LoRA train,
    their exports load outside Lightning with the shapes of freshly built nets, and the evaluation runs on them. The
    base is trained first without FSDP (its export is not gathered)."""
    from mchar.core.gistnet import from_pretrained as gistnet_from
    from mchar.core.lensnet import from_pretrained as lensnet_from
    from tests.lit.test_ddp import _fit

    _fit(tmp_path, "stages=[base_lm]")
    devices = min(2, torch.cuda.device_count())
    _fit(
        tmp_path,
        "stages=[gistnet,lensnet,e2e,eval]",
        "trainer=fsdp",
        f"trainer.devices={devices}",
        "lensnet.max_steps=4",
        "e2e.max_steps=4",
        "e2e.lora=true",
        "eval.policies=[recency,lensnet]",
        timeout=600,
    )
    art = tmp_path / "art"
    gist, lens = gistnet_from(art / "gistnet" / "smoke"), lensnet_from(art / "lensnet" / "smoke")
    assert gist.out_scale.shape == (1,) and all(p.dim() > 0 for p in gist.parameters())
    assert all(p.numel() > 0 for p in (*gist.parameters(), *lens.parameters()))
    assert (art / "e2e" / "smoke" / "lora.safetensors").exists()


def test_a_session_scores_the_same_on_gpu_and_cpu() -> None:
    """Random refocusing (expands and collapses at every block) over 200 tokens, then a continuation scored: the
    GPU session's log-probs match the CPU session's."""
    from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
    from mchar.core.allocator import FocusAllocator
    from mchar.core.gistnet import GistNet
    from mchar.core.session import MegaContextSession
    from mchar.core.tree import MegaContextTree
    from tests.core.test_session import VOCAB, K, RandomPolicy, _ids

    logprobs = {}
    for device in ("cpu", "cuda"):
        model = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, seed=1)
        base = FrozenBaseLM(model.to(device))
        gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).to(device).eval()
        tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
        alloc = FocusAllocator(tau_expand=0.2, tau_collapse=0.2, max_edits=4, cooldown=1, protect_tokens=K)
        session = MegaContextSession(base, tree, alloc, RandomPolicy(0), 48, refocus_every=K)
        with torch.no_grad():
            session.ingest(_ids(200))
            logprobs[device] = session.score(_ids(16, seed=3))[1].cpu()
    torch.testing.assert_close(logprobs["cuda"], logprobs["cpu"], atol=1e-3, rtol=1e-3)
