"""GistNet: shapes, scale matching, pooling variants, levels, CLS sees the block, gradients, export."""

from __future__ import annotations

import pytest
import torch

from mchar.core.gistnet import GistNet, MeanPoolGistNet, from_config, from_pretrained, make_gistnet

D, K = 32, 8


def _x(n: int = 5, scale: float = 0.02, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, K, D, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("pooling", ["mean", "query", "cls"])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_shapes_and_scale(pooling: str, head: str) -> None:
    net = GistNet(D, K, pooling=pooling, head=head, width=16, out_scale=0.02)
    y = net(_x(), 1)
    assert y.shape == (5, D)
    rms = y.pow(2).mean(dim=-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.02), rtol=1e-3)
    # scale invariance of the input: gists of gists (any scale) land at the same output scale
    assert torch.allclose(net(_x(scale=5.0), 2).pow(2).mean(-1).sqrt(), rms, rtol=1e-3)


def test_level_embedding_and_per_level_nets() -> None:
    x = _x()
    shared = GistNet(D, K, max_level=3)
    assert not torch.allclose(shared(x, 1), shared(x, 2))
    per_level = GistNet(D, K, max_level=3, shared=False)
    assert len(per_level.nets) == 3
    assert not torch.allclose(per_level(x, 1), per_level(x, 3))
    with pytest.raises(ValueError):
        per_level(x, 4)
    with pytest.raises(ValueError):
        shared(torch.zeros(2, K + 1, D), 1)


def test_cls_is_bidirectional() -> None:
    """Upstream's causal CLS ignored the block; ours must change when any (non-first) token changes."""
    net = GistNet(D, K, pooling="cls")
    x = _x(1)
    y0 = net(x, 1)
    x2 = x.clone()
    x2[0, -1] += 0.05
    assert not torch.allclose(y0, net(x2, 1))
    x3 = x.clone()
    x3[0, 3] += 0.05
    assert not torch.allclose(y0, net(x3, 1))


@pytest.mark.parametrize("kind", ["transformer", "mean"])
def test_gradients_reach_every_param(kind: str) -> None:
    net = make_gistnet(kind, d_model=D, block_size=K, pooling="query", head="mlp", width=16)
    x = _x()
    y = net(x, 1)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in net.named_parameters():
        if kind == "transformer" and name.startswith("nets.0.level"):
            assert p.grad is not None and p.grad[1].abs().sum() > 0, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mean_baseline_is_block_mean_at_init() -> None:
    net = MeanPoolGistNet(D, K, rescale=False)
    x = _x()
    assert torch.allclose(net(x, 1), x.mean(dim=1), atol=1e-6)
    scaled = MeanPoolGistNet(D, K, out_scale=0.5)
    assert torch.allclose(scaled(x, 1).pow(2).mean(-1).sqrt(), torch.full((5,), 0.5), rtol=1e-3)


@pytest.mark.parametrize("kind", ["transformer", "mean"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    net = make_gistnet(kind, d_model=D, block_size=K, pooling="cls", shared=False, max_level=2, out_scale=0.3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    net.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "model.safetensors").exists() and (tmp_path / "g" / "config.json").exists()
    again = from_pretrained(tmp_path / "g")
    assert type(again) is type(net)
    x = _x()
    assert torch.equal(net(x, 2), again(x, 2))
    rebuilt = from_config(net.config_dict())
    assert type(rebuilt) is type(net)
    assert type(net).from_pretrained(tmp_path / "g").config_dict() == net.config_dict()


def test_gradients_flow_through_frozen_base_into_gistnet_only() -> None:
    from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm

    base = FrozenBaseLM(tiny_causal_lm("llama", vocab_size=64, hidden_size=D, layers=1, heads=4))
    net = GistNet(D, K, out_scale=base.embedding_rms)
    ids = torch.randint(0, 64, (1, 3 * K))
    emb = base.embed(ids)
    gists = net(emb[0, : 2 * K].reshape(2, K, D), 1)
    x = torch.cat([gists.unsqueeze(0), emb[:, 2 * K :]], dim=1)
    pos = torch.cat([torch.tensor([K // 2, K + K // 2]), torch.arange(2 * K, 3 * K)]).unsqueeze(0)
    logits, _ = base.forward_embeds(x, pos)
    torch.nn.functional.cross_entropy(logits[0, 1:-1], ids[0, 2 * K :]).backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "level" not in n
    )


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_residual_mean_starts_at_the_mean_summary_and_learns_a_correction(tmp_path, head: str) -> None:
    torch.manual_seed(0)
    net = GistNet(16, 4, n_layers=1, n_heads=2, head=head, max_level=2, out_scale=0.5, residual_mean=True)
    x = torch.randn(3, 4, 16)
    m = x.mean(1)
    want = m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True)) * 0.5
    for level in (1, 2):
        assert torch.allclose(net(x, level), want, atol=1e-5)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):  # the zero-initialised last layer moves first, then the trunk behind it
        opt.zero_grad()
        net(x, 1).pow(3).sum().backward()
        opt.step()
    assert not torch.allclose(net(x, 1), want, atol=1e-3)
    net.save_pretrained(tmp_path / "g")
    back = from_pretrained(tmp_path / "g")
    assert back.residual_mean and torch.allclose(back(x, 1), net(x, 1))


def test_a_broken_export_is_one_line_naming_the_file(tmp_path) -> None:
    from mchar.core.lensnet import LensNet

    good = tmp_path / "g"
    make_gistnet("transformer", d_model=32, block_size=8, n_layers=1, n_heads=4).save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()
    cases = {
        "truncated weights": (
            "model.safetensors",
            weights[: len(weights) // 2],
            r"model.safetensors: unreadable",
        ),
        "no weights": ("model.safetensors", None, r"model.safetensors: unreadable"),
        "bad json": ("config.json", "{bad", r"config.json: unreadable"),
        "not an object": ("config.json", "[1, 2]", r"config.json: expected a JSON object"),
        "another net's config": (
            "config.json",
            config.replace('"d_model": 32', '"d_model": 48'),
            "does not load",
        ),
    }
    for what, (name, content, pattern) in cases.items():
        broken = tmp_path / what.replace(" ", "_")
        broken.mkdir()
        (broken / "config.json").write_text(config)
        (broken / "model.safetensors").write_bytes(weights)
        if content is None:
            (broken / name).unlink()
        elif isinstance(content, bytes):
            (broken / name).write_bytes(content)
        else:
            (broken / name).write_text(content)
        with pytest.raises(ValueError, match=pattern) as info:
            from_pretrained(broken)
        assert "\n" not in str(info.value), what
    with pytest.raises(ValueError, match="does not load"):
        LensNet.from_pretrained(good)  # a GistNet export is not a LensNet


def test_an_export_with_a_scalar_out_scale_still_loads(tmp_path) -> None:
    """out_scale became 1-D (FSDP cannot wrap scalar parameters); exports written before load unchanged."""
    from safetensors.torch import load_file, save_file

    net = GistNet(16, 4, max_level=2, n_layers=1, n_heads=2, out_scale=0.5)
    net.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["out_scale"] = weights["out_scale"].reshape(())
    save_file(weights, tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path)
    assert loaded.out_scale.shape == (1,) and float(loaded.out_scale) == 0.5
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(loaded(x, 1), net(x, 1))
