"""Stitch layers and token alignment on tiny random-init encoders of every family."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import featcache
from featcache.encoders.base import TokenLayout
from stitchtrain.model import stitches
from stitchtrain.model.stitches import Stitch, TokenAligner, build_stitch

# (id, load_encoder name, kwargs): the four tiny presets plus a 4x4-grid DINOv2
ENCODERS = {
    "dinov2": ("dinov2-tiny", {}),
    "dinov3": ("dinov3-tiny", {}),
    "siglip2": ("siglip2-tiny", {}),
    "clip": ("clip-tiny", {}),
    "dinov2-4x4": (
        "timm:vit_small_patch14_dinov2",
        dict(random_init=True, img_size=56, depth=4, embed_dim=64, num_heads=2, init_values=0.5),
    ),
}
PAIRS = list(itertools.product(ENCODERS, repeat=2))


@pytest.fixture(scope="module")
def encoders() -> dict[str, featcache.Encoder]:
    return {key: featcache.load_encoder(name, **kw) for key, (name, kw) in ENCODERS.items()}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _images(encoder: featcache.Encoder, batch: int = 2) -> torch.Tensor:
    return _randn(batch, 3, *encoder.image_size, seed=1)


def _build(kind: str, source: featcache.Encoder, target: featcache.Encoder, **kw) -> Stitch:
    return build_stitch(
        kind,
        source=source.layout,
        target=target.layout,
        source_width=source.width,
        target_width=target.width,
        **kw,
    )


# -- token alignment ------------------------------------------------------------------------------
@pytest.mark.parametrize("source_id,target_id", PAIRS, ids=[f"{s}->{t}" for s, t in PAIRS])
def test_aligner_shapes_and_identity(encoders, source_id, target_id):
    source, target = encoders[source_id].layout, encoders[target_id].layout
    aligner = TokenAligner(source, target)
    tokens = _randn(3, source.num_tokens, 7)  # (B, Ts, D)
    aligned = aligner(tokens)
    assert aligned.shape == (3, target.num_tokens, 7)
    assert aligner.prefix_shared == (source.prefix == target.prefix)
    if source == target:  # e.g. dinov2-tiny <-> clip-tiny: same prefix and grid
        assert torch.equal(aligned, tokens)
    elif source.grid == target.grid:  # patches pass through untouched
        assert torch.equal(aligned[:, target.num_prefix_tokens :], tokens[:, len(source.prefix) :])


def test_aligner_identity_calls_no_interpolation(monkeypatch):
    layout = TokenLayout(("cls",), (8, 8))

    def forbidden(*args, **kwargs):
        raise AssertionError("F.interpolate called for matching grids")

    monkeypatch.setattr(torch.nn.functional, "interpolate", forbidden)
    tokens = _randn(2, 65, 4)
    assert TokenAligner(layout, TokenLayout(("cls",), (8, 8)))(tokens) is tokens
    prefix_change = TokenAligner(layout, TokenLayout(("cls", "reg0"), (8, 8)))
    assert prefix_change(_randn(2, 65, 4)).shape == (2, 66, 4)


@pytest.mark.parametrize("source_grid,target_grid", [((8, 8), (4, 4)), ((4, 4), (8, 8))])
def test_grid_resampling_is_bilinear(source_grid, target_grid):
    aligner = TokenAligner(TokenLayout((), source_grid), TokenLayout((), target_grid))
    (hs, ws), (ht, wt) = source_grid, target_grid
    constant = torch.full((2, hs * ws, 3), 1.25)
    assert torch.allclose(aligner(constant), torch.full((2, ht * wt, 3), 1.25))

    # a ramp 2*row - 3*col + 1 stays that ramp, sampled at align_corners=False centres
    rows, cols = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
    ramp = (2.0 * rows - 3.0 * cols + 1).reshape(1, hs * ws, 1).double()
    out_rows = ((torch.arange(ht) + 0.5) * hs / ht - 0.5).clamp(0, hs - 1)
    out_cols = ((torch.arange(wt) + 0.5) * ws / wt - 0.5).clamp(0, ws - 1)
    expected = 2.0 * out_rows[:, None] - 3.0 * out_cols[None, :] + 1  # (Ht, Wt)
    assert torch.allclose(aligner(ramp).reshape(ht, wt), expected.double())


def test_prefix_policy(encoders):
    dinov2, dinov3, siglip2 = encoders["dinov2"], encoders["dinov3"], encoders["siglip2"]
    tokens = _randn(2, dinov3.num_tokens, 5)  # dinov3 -> dinov2: keep CLS, drop registers
    aligned = TokenAligner(dinov3.layout, dinov2.layout)(tokens)
    assert torch.equal(aligned[:, 0], tokens[:, 0])
    assert torch.equal(aligned[:, 1:], tokens[:, 5:])

    tokens = _randn(2, dinov2.num_tokens, 5)  # dinov2 -> dinov3: CLS into all 5 slots
    aligned = TokenAligner(dinov2.layout, dinov3.layout)(tokens)
    assert torch.equal(aligned[:, :5], tokens[:, :1].expand(-1, 5, -1))
    assert torch.equal(aligned[:, 5:], tokens[:, 1:])

    tokens = _randn(2, siglip2.num_tokens, 5)  # siglip2 -> dinov2: mean patch into CLS
    aligned = TokenAligner(siglip2.layout, dinov2.layout)(tokens)
    assert torch.allclose(aligned[:, 0], tokens.mean(dim=1))
    assert torch.equal(aligned[:, 1:], tokens)

    tokens = _randn(2, dinov2.num_tokens, 5)  # dinov2 -> siglip2: CLS dropped
    assert torch.equal(TokenAligner(dinov2.layout, siglip2.layout)(tokens), tokens[:, 1:])


def test_aligner_rejects_wrong_token_count(encoders):
    aligner = TokenAligner(encoders["dinov2"].layout, encoders["dinov3"].layout)
    with pytest.raises(ValueError, match=r"\(B, 65, D\).*Got \(2, 64, 5\)"):
        aligner(_randn(2, 64, 5))


# -- identity and least squares -------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_identity_self_stitch_reproduces_target(encoders, n):
    encoder = encoders["dinov2"]
    stitch = _build("linear", encoder, encoder)
    stitch.init_identity()
    with torch.no_grad():
        layer = encoder.run(_images(encoder), upto=n)
        stitched = stitch(layer)
        assert torch.equal(stitched, layer)
        for got, want in zip(
            encoder.run_from(stitched, n), encoder.run_from(layer, n), strict=True
        ):
            assert torch.equal(got, want)


def _planted(layout: TokenLayout, ds: int, dt: int, images: int, noise: float = 1e-4):
    """Random source tokens and target = source @ W* + b* + noise, same layout."""
    source = _randn(images, layout.num_tokens, ds, seed=2)
    weight, bias = _randn(ds, dt, seed=3) / ds**0.5, _randn(dt, seed=4)
    target = source @ weight + bias + noise * _randn(images, layout.num_tokens, dt, seed=5)
    return source, target, weight, bias


def test_lstsq_recovers_planted_map_and_matches_numpy():
    layout, ds, dt = TokenLayout(("cls",), (4, 4)), 12, 9
    source, target, weight, bias = _planted(layout, ds, dt, images=6)
    stitch = build_stitch("linear", source=layout, target=layout, source_width=ds, target_width=dt)
    stitch.init_lstsq(source, target)
    assert torch.allclose(stitch.map.weight.T, weight, atol=1e-3)
    assert torch.allclose(stitch.map.bias, bias, atol=1e-3)

    design = np.concatenate([source.reshape(-1, ds).double(), np.ones((6 * 17, 1))], axis=1)
    solution = np.linalg.lstsq(design, target.reshape(-1, dt).double().numpy(), rcond=None)[0]
    assert np.allclose(stitch.map.weight.detach().T.numpy(), solution[:ds], atol=1e-5)
    assert np.allclose(stitch.map.bias.detach().numpy(), solution[ds], atol=1e-5)


def test_lstsq_ridge_matches_closed_form_with_unpenalised_bias():
    layout, ds, dt, ridge = TokenLayout((), (2, 2)), 6, 4, 3.0
    source, target, _, _ = _planted(layout, ds, dt, images=5, noise=0.5)
    stitch = build_stitch("linear", source=layout, target=layout, source_width=ds, target_width=dt)
    stitch.init_lstsq(source, target, ridge=ridge)
    x = np.concatenate([source.reshape(-1, ds).double().numpy(), np.ones((20, 1))], axis=1)
    penalty = np.diag([ridge] * ds + [0.0])
    solution = np.linalg.solve(x.T @ x + penalty, x.T @ target.reshape(-1, dt).double().numpy())
    assert np.allclose(stitch.map.weight.detach().T.numpy(), solution[:ds], atol=1e-5)
    assert np.allclose(stitch.map.bias.detach().numpy(), solution[ds], atol=1e-5)


def test_lstsq_batches_equal_one_shot_and_align_first(encoders, monkeypatch):
    source_layout, target_layout = encoders["dinov2-4x4"].layout, encoders["dinov3"].layout
    source = _randn(9, source_layout.num_tokens, 8, seed=6)
    target = _randn(9, target_layout.num_tokens, 5, seed=7)
    kwargs = dict(source=source_layout, target=target_layout, source_width=8, target_width=5)
    one_shot, batched = build_stitch("linear", **kwargs), build_stitch("linear", **kwargs)
    one_shot.init_lstsq(source, target)
    monkeypatch.setattr(stitches, "_LSTSQ_CHUNK_TOKENS", 100)  # and one image per chunk
    batched.init_lstsq_batches(zip(source.split(4), target.split(4), strict=True))
    assert torch.allclose(one_shot.map.weight, batched.map.weight, atol=1e-6)
    assert torch.allclose(one_shot.map.bias, batched.map.bias, atol=1e-6)
    assert torch.equal(one_shot.prefix_offsets, torch.zeros(5, 5))
    # the fit is over aligned tokens: residuals are orthogonal to the aligned source
    with torch.no_grad():
        residual = (one_shot(source) - target).reshape(-1, 5).double()
        aligned = one_shot.align(source).reshape(-1, 8).double()
    assert torch.allclose(aligned.T @ residual, torch.zeros(8, 5, dtype=torch.float64), atol=1e-3)


# -- linear / mlp across families -----------------------------------------------------------------
CROSS = [("dinov2", "siglip2"), ("siglip2", "dinov3"), ("dinov3", "clip"), ("clip", "dinov2-4x4")]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("source_id,target_id", CROSS, ids=[f"{s}->{t}" for s, t in CROSS])
def test_linear_and_mlp_shapes_and_offsets(encoders, kind, source_id, target_id):
    source, target = encoders[source_id], encoders[target_id]
    stitch = _build(kind, source, target)
    tokens = _randn(2, source.num_tokens, source.width, seed=8)
    out = stitch(tokens)
    assert out.shape == (2, target.num_tokens, target.width)
    has_offsets = source.layout.prefix != target.layout.prefix and target.num_prefix_tokens > 0
    assert (stitch.prefix_offsets is not None) == has_offsets
    if has_offsets:
        assert stitch.prefix_offsets.shape == (target.num_prefix_tokens, target.width)
        assert torch.equal(stitch.prefix_offsets, torch.zeros_like(stitch.prefix_offsets))
        out.square().sum().backward()
        assert stitch.prefix_offsets.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(stitch(tokens)).all()


def test_mlp_hidden_width_and_trainable_count(encoders):
    dinov2, siglip2 = encoders["dinov2"], encoders["siglip2"]
    stitch = _build("mlp", dinov2, siglip2)
    assert stitch.map[0].out_features == siglip2.width  # default H = Dt
    assert stitch.num_trainable() == 96 * 128 + 128 + 128 * 128 + 128
    assert _build("mlp", dinov2, siglip2, mlp_hidden=32).map[0].out_features == 32
    self_stitch = _build("linear", dinov2, dinov2)
    assert self_stitch.prefix_offsets is None and self_stitch.num_trainable() == 96 * 96 + 96


# -- LoRA ----------------------------------------------------------------------------------------
def _lora(encoders, source_id, target_id=None, position=3, **kw) -> Stitch:
    source = encoders[source_id]
    target = encoders[target_id or source_id]
    return _build("lora", source, target, source_encoder=source, position=position, **kw)


@pytest.mark.parametrize("source_id", ["dinov2", "dinov3", "clip"])
def test_lora_starts_as_source_block_and_trains_only_lora(encoders, source_id):
    encoder = encoders[source_id]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    stitch = _lora(encoders, source_id)
    names = [name for name, _ in stitch.named_parameters()]
    assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
    assert len(names) == 8  # A and B on qkv / in_proj, out proj, fc1, fc2
    assert set(stitch.state_dict()) == set(names)

    with torch.no_grad():
        layer_2 = encoder.run(_images(encoder), upto=2)
        layer_3 = encoder.run(_images(encoder), upto=3)
        at_init = stitch(layer_2)
    assert torch.allclose(at_init, layer_3, atol=1e-6)
    if source_id == "dinov2":
        assert torch.equal(at_init, layer_3)  # B = 0: exactly source block n

    optimizer = torch.optim.AdamW(stitch.parameters(), lr=1e-2)
    loss = (stitch(layer_2) * _randn(*layer_3.shape, seed=9)).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(stitch(layer_2), at_init)
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in encoder.parameters())


def test_lora_state_dict_round_trip(encoders):
    stitch = _lora(encoders, "dinov3", "dinov2", lora_rank=2, lora_alpha=4.0)
    with torch.no_grad():
        for parameter in stitch.parameters():
            parameter.add_(0.1)
    fresh = _lora(encoders, "dinov3", "dinov2", lora_rank=2, lora_alpha=4.0)
    fresh.load_state_dict(stitch.state_dict())
    layer = encoders["dinov3"].run(_images(encoders["dinov3"]), upto=2)
    with torch.no_grad():
        assert torch.equal(fresh(layer), stitch(layer))


def test_lora_cross_width_has_projection(encoders):
    stitch = _lora(encoders, "dinov2", "siglip2", lora_rank=4)
    assert isinstance(stitch.map, torch.nn.Linear)
    assert (stitch.map.in_features, stitch.map.out_features) == (96, 128)
    assert stitch.prefix_offsets is None  # SigLIP2 has no prefix slots
    lora = 4 * ((96 + 3 * 96) + (96 + 96) + (96 + 4 * 96) + (4 * 96 + 96))
    assert stitch.num_trainable() == lora + 96 * 128 + 128
    layer = encoders["dinov2"].run(_images(encoders["dinov2"]), upto=2)
    assert stitch(layer).shape == (2, 64, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(stitch(layer)).all()
    stitch.train()
    assert not stitch.block.training and stitch.map.training


# -- errors ---------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(encoders):
    dinov2, siglip2 = encoders["dinov2"], encoders["siglip2"]
    with pytest.raises(ValueError, match=r"stitch kind in \('linear', 'mlp', 'lora'\).*'conv'"):
        _build("conv", dinov2, siglip2)
    with pytest.raises(ValueError, match="source_encoder="):
        _build("lora", dinov2, siglip2, position=2)
    with pytest.raises(ValueError, match=r"position in 1\.\.6 .*Got 0"):
        _build("lora", dinov2, siglip2, source_encoder=dinov2, position=0)
    with pytest.raises(ValueError, match=r"position in 1\.\.6 .*Got 7"):
        _build("lora", dinov2, siglip2, source_encoder=dinov2, position=7)
    with pytest.raises(ValueError, match=r"width 128"):
        _build("lora", siglip2, dinov2, source_encoder=dinov2, position=2)
    with pytest.raises(ValueError, match=r"width 96 .*prefix=\('cls',\).* width 128 .*prefix=\(\)"):
        _build("linear", dinov2, siglip2).init_identity()
    with pytest.raises(ValueError, match="'mlp'.*use kind='linear'"):
        _build("mlp", dinov2, dinov2).init_identity()
    with pytest.raises(ValueError, match="kind='linear' only. Got kind='mlp'"):
        _build("mlp", dinov2, dinov2).init_lstsq(_randn(1, 65, 96), _randn(1, 65, 96))
    with pytest.raises(ValueError, match=r"target tokens of shape \(B, 64, 128\)"):
        _build("linear", dinov2, siglip2).init_lstsq(_randn(1, 65, 96), _randn(1, 65, 128))
