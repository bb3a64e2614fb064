"""Every adapter equals its library's own forward, bit for bit, at every split point."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, FAMILY_IDS
from safetensors.torch import save_file

import featcache
from featcache.errors import LayerIndexError, UnknownModelError, WeightsUnavailableError


def _images(encoder, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *encoder.image_size, generator=generator)


def _library_final_and_pooled(encoder, images):
    """(final tokens, pooled) computed by the library's own public forward."""
    module = encoder.module
    with torch.no_grad():
        if encoder.family in ("timm-vit", "timm-eva"):
            final = module.forward_features(images)
            return final, module.forward_head(final, pre_logits=True)
        if encoder.family == "open_clip-timm":
            return module.trunk.forward_features(images), module(images)
        # open_clip native: normalised last-block tokens + image features, one call
        out = module.forward_intermediates(
            images,
            indices=[encoder.depth - 1],
            normalize_intermediates=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        final = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], 1)
        return final, module(images)


def _library_layer(encoder, images, n):
    """Layer n tokens (prefix first) from the library's ``forward_intermediates``."""
    module = encoder.module
    with torch.no_grad():
        if encoder.family == "open_clip-vit":
            out = module.forward_intermediates(
                images,
                indices=[n - 1],
                output_fmt="NLC",
                output_extra_tokens=True,
                intermediates_only=True,
            )
            prefix, patches = out["image_intermediates_prefix"][0], out["image_intermediates"][0]
            return torch.cat([prefix, patches], 1)
        trunk = module.trunk if encoder.family == "open_clip-timm" else module
        (taken,) = trunk.forward_intermediates(
            images,
            indices=[n - 1],
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        if encoder.num_prefix_tokens == 0:  # timm returns bare patch tokens, no (patches, prefix)
            return taken
        patches, prefix = taken
        return torch.cat([prefix, patches], 1)


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_split_forward_equals_library_forward(encoder_cache, family_id):
    encoder = encoder_cache(family_id)
    images = _images(encoder)
    ref_final, ref_pooled = _library_final_and_pooled(encoder, images)
    middle = encoder.depth // 2
    for n in sorted({0, 1, middle, encoder.depth}):
        with torch.no_grad():
            final, pooled = encoder.run_from(encoder.run(images, upto=n), n)
        assert torch.equal(final, ref_final), f"{family_id}: final differs at split {n}"
        assert torch.equal(pooled, ref_pooled), f"{family_id}: pooled differs at split {n}"


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_run_equals_forward_intermediates(encoder_cache, family_id):
    encoder = encoder_cache(family_id)
    images = _images(encoder, seed=1)
    for n in range(1, encoder.depth + 1):
        with torch.no_grad():
            ours = encoder.run(images, upto=n)
        assert torch.equal(ours, _library_layer(encoder, images, n)), f"layer {n}"


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_token_layout(encoder_cache, family):
    family_id, _, _, prefix, grid = family
    encoder = encoder_cache(family_id)
    assert encoder.layout.prefix == prefix
    assert encoder.grid == grid
    assert encoder.num_prefix_tokens == len(prefix)
    assert encoder.layout.has_cls == ("cls" in prefix)
    with torch.no_grad():
        tokens = encoder.run(_images(encoder, batch=1), upto=1)
    assert tokens.shape == (1, len(prefix) + grid[0] * grid[1], encoder.width)


def test_layers_change_tokens(encoder_cache):
    """Tiny presets are not near-identity: each block moves the tokens (LayerScale 0.5)."""
    for family_id in ("dinov2", "dinov3"):
        encoder = encoder_cache(family_id)
        images = _images(encoder)
        with torch.no_grad():
            before, after = encoder.run(images, upto=1), encoder.run(images, upto=2)
        assert (after - before).norm() > 0.05 * before.norm()


def test_gradients_reach_tokens_not_weights(encoder_cache):
    encoder = encoder_cache("dinov3")
    with torch.no_grad():
        tokens = encoder.run(_images(encoder), upto=2)
    tokens.requires_grad_(True)
    final, pooled = encoder.run_from(tokens, 2)
    (final.square().mean() + pooled.square().mean()).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_layer_index_errors(encoder_cache):
    encoder = encoder_cache("dinov2")
    images = _images(encoder, batch=1)
    for bad in (-1, encoder.depth + 1):
        with pytest.raises(LayerIndexError, match=rf"0\.\.{encoder.depth}.*Got {bad}"):
            encoder.run(images, upto=bad)
    with pytest.raises(LayerIndexError):
        encoder.run_from(torch.zeros(1, encoder.num_tokens, encoder.width), encoder.depth + 1)


def test_fingerprint_stable_and_sensitive():
    first = featcache.load_encoder("dinov2-tiny")
    second = featcache.load_encoder("dinov2-tiny")
    assert first.fingerprint == second.fingerprint
    assert featcache.load_encoder("dinov2-tiny", seed=1).fingerprint != first.fingerprint
    with torch.no_grad():
        second.module.blocks[3].mlp.fc1.weight[0, 0] += 1e-3
    second._fingerprint = None
    assert second.fingerprint != first.fingerprint
    assert featcache.load_encoder("dinov3-tiny").fingerprint != first.fingerprint


def test_weights_file_round_trip(tmp_path, encoder_cache):
    """A safetensors state dict reproduces the encoder (timm, and open_clip with visual.)."""
    tiny = encoder_cache("dinov2")
    path = tmp_path / "dinov2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.module.state_dict().items()}, str(path))
    overrides = featcache.PRESETS["dinov2-tiny"].overrides
    loaded = featcache.load_encoder("timm:vit_small_patch14_dinov2", weights=path, **overrides)
    assert loaded.fingerprint == tiny.fingerprint

    clip = encoder_cache("clip-open_clip")
    path = tmp_path / "clip_tiny.safetensors"
    state = {f"visual.{k}": v.contiguous() for k, v in clip.module.state_dict().items()}
    state["text_projection"] = torch.zeros(4, 4)  # a full CLIP checkpoint: text keys ignored
    save_file(state, str(path))
    loaded = featcache.load_encoder(
        "open_clip:ViT-B-16", weights=path, **featcache.PRESETS["clip-tiny"].overrides
    )
    assert loaded.fingerprint == clip.fingerprint


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        featcache.load_encoder("dinov2-tiny", weights=tmp_path / "missing.safetensors")
    pickle = tmp_path / "w.pt"
    pickle.write_bytes(b"x")
    with pytest.raises(WeightsUnavailableError, match=r"\.safetensors"):
        featcache.load_encoder("dinov2-tiny", weights=pickle)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"not_a_key": torch.zeros(2)}, str(wrong))
    with pytest.raises(WeightsUnavailableError, match="wrong.safetensors"):
        featcache.load_encoder("dinov2-tiny", weights=wrong)


def test_real_preset_without_weights_says_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        featcache.load_encoder("dinov2-s")
    message = str(info.value)
    assert "dinov2-s" in message and "vit_small_patch14_dinov2" in message
    assert "--weights" in message and "--random-init" in message


def test_random_init_of_real_preset_has_paper_grid():
    encoder = featcache.load_encoder("dinov2-s", random_init=True, depth=2)
    assert encoder.grid == (24, 24) and encoder.image_size == (336, 336)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dinov2-tny", "dinov2-tiny"),
        ("siglip-l", "siglip2-l"),
        ("timm:vit_small_patch14_dinov", "timm:vit_small_patch14_dinov2"),
        ("open_clip:ViT-B-16-SigLIP", "open_clip:ViT-B-16-SigLIP"),
    ],
)
def test_unknown_model_lists_close_matches(name, expected):
    with pytest.raises(UnknownModelError, match="Close matches") as info:
        featcache.load_encoder(name + ("x" if name.startswith("open_clip") else ""))
    assert expected in str(info.value)


def test_unknown_open_clip_tag():
    with pytest.raises(UnknownModelError, match="openai"):
        featcache.load_encoder("open_clip:ViT-L-14-336@nope")


def test_random_init_is_identical_across_processes():
    """Seeded random weights give one fingerprint in every process (threading must not leak in)."""
    import subprocess
    import sys

    names = ["dinov2-tiny", "dinov3-tiny", "siglip2-tiny", "clip-tiny"]
    code = (
        "import featcache\n"
        f"for name in {names!r}:\n"
        "    print(featcache.load_encoder(name).fingerprint)\n"
        "print(featcache.load_encoder('timm:vit_small_patch14_dinov2', random_init=True,"
        " depth=2, img_size=112).fingerprint)\n"
    )
    here = [featcache.load_encoder(name).fingerprint for name in names]
    here.append(
        featcache.load_encoder(
            "timm:vit_small_patch14_dinov2", random_init=True, depth=2, img_size=112
        ).fingerprint
    )
    processes = [  # three at once: each is mostly its imports
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for process in processes:
        stdout, _ = process.communicate(timeout=300)
        assert process.returncode == 0
        assert stdout.split() == here


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_run_block_steps_one_layer(encoder_cache, family_id):
    encoder = encoder_cache(family_id)
    images = _images(encoder)
    with torch.no_grad():
        before = encoder.run(images, upto=1)
        stepped = encoder.run_block(2, before)
        substituted = encoder.run_block(2, before, block=encoder.block(2))
    assert torch.equal(stepped, encoder.run(images, upto=2))
    assert torch.equal(substituted, stepped)
    with pytest.raises(LayerIndexError):
        encoder.block(0)
