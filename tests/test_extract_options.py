"""Extraction options: storage dtypes, compression, token selection, float16 overflow, and one
decode per image for several encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featcache.extract.decode as extract_module
from featcache.demo_data import make_demo_dataset
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore, bfloat16_bits_to_float32, float32_to_bfloat16_bits


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("opts"), num_classes=2, per_class=6)


def _extract(manifest, out, models=("dinov2-tiny",), encoders=None, **options):
    config = ExtractConfig(
        models=list(models),
        data=str(manifest),
        out=str(out),
        layers=options.pop("layers", [2, 6]),
        shard_size=4,
        batch_size=4,
        **options,
    )
    plan = plan_extraction(config, encoders=encoders)
    return plan, run_extraction(plan)


def _reference(plan, tmp_path, manifest):
    reference_plan, _ = _extract(
        manifest, tmp_path / "ref", models=plan.config.models, dtype="float32"
    )
    return FeatureStore.open(reference_plan.urls[0])


def test_bfloat16_bits_round_trip_like_torch():
    values = np.array([1.0, -3.14159, 65504.0 * 4, 1e-30, np.nan], np.float32)
    bits = float32_to_bfloat16_bits(values)
    expected = torch.from_numpy(values).bfloat16().view(torch.uint16).numpy()
    assert np.array_equal(bits[:4], expected[:4])
    back = bfloat16_bits_to_float32(bits)
    assert np.allclose(back[:4], torch.from_numpy(values[:4]).bfloat16().float().numpy())
    assert np.isnan(back[4])


@pytest.mark.parametrize(
    "dtype, storage, rtol", [("bfloat16", np.uint16, 2**-8), ("float32", np.float32, 0)]
)
def test_storage_dtypes(tmp_path, manifest, dtype, storage, rtol):
    plan, _ = _extract(manifest, tmp_path / dtype, dtype=dtype)
    store = FeatureStore.open(plan.urls[0])
    assert store.group["layers/2"].dtype == storage
    assert store.attrs["logical_dtype"] == dtype
    reference = _reference(plan, tmp_path, manifest)
    for name in ("layers/2", "final", "pooled"):
        np.testing.assert_allclose(store.read(name), reference.read(name), rtol=rtol, atol=1e-6)
    assert store.verify() == []


def test_zstd_is_lossless_and_bitround_is_bounded(tmp_path, manifest):
    plain, _ = _extract(manifest, tmp_path / "none")
    zstd, _ = _extract(manifest, tmp_path / "zstd", compression="zstd")
    rounded, _ = _extract(manifest, tmp_path / "br", compression="bitround:4")
    plain, zstd, rounded = (FeatureStore.open(p.urls[0]) for p in (plain, zstd, rounded))
    assert plain.attrs["store_id"] != zstd.attrs["store_id"] != rounded.attrs["store_id"]
    values = plain.read("layers/6")
    assert np.array_equal(zstd.read("layers/6"), values)
    approx = rounded.read("layers/6")
    assert not np.array_equal(approx, values)
    # 4 of 10 mantissa bits kept; float16 subnormals (< 2**-14) carry fewer bits still
    np.testing.assert_allclose(approx, values, rtol=2**-5, atol=2**-14)
    assert rounded.nbytes_stored() < zstd.nbytes_stored() <= plain.nbytes_stored()


def test_tokens_prefix_and_pooled(tmp_path, manifest):
    plan, _ = _extract(manifest, tmp_path / "prefix", models=["dinov3-tiny"], tokens="prefix")
    store = FeatureStore.open(plan.urls[0])
    assert store.group["layers/2"].shape[1:] == (5, 128)  # CLS + 4 registers
    plan, _ = _extract(manifest, tmp_path / "pooled", tokens="pooled")
    store = FeatureStore.open(plan.urls[0])
    assert "layers" not in store.group and "final" not in store.group
    assert store.read("pooled").shape == (8, 96) and store.verify() == []  # 2 x 4 train
    with pytest.raises(FeatcacheError, match="siglip2-tiny has none"):
        _extract(manifest, tmp_path / "bad", models=["siglip2-tiny"], tokens="prefix")


def test_float16_overflow_is_refused_with_advice(tmp_path, manifest):
    encoder = featcache_encoder_with_massive_activation()
    with pytest.raises(FeatcacheError, match=r"float16's max 65504.*--dtype bfloat16"):
        _extract(manifest, tmp_path / "f16", encoders=[encoder])
    plan, _ = _extract(manifest, tmp_path / "bf16", encoders=[encoder], dtype="bfloat16")
    store = FeatureStore.open(plan.urls[0])
    assert np.abs(store.read("layers/6")).max() > 65504 and store.verify() == []


def featcache_encoder_with_massive_activation():
    import featcache

    encoder = featcache.load_encoder("dinov2-tiny")
    with torch.no_grad():
        encoder.module.blocks[0].mlp.fc2.bias[3] = 1e6  # one channel of every token explodes
    encoder._fingerprint = None
    return encoder


def test_each_image_decoded_once_for_several_encoders(tmp_path, manifest, monkeypatch):
    calls = []
    original = extract_module.decode_image

    def counting(data, **kwargs):  # the bytes read once (Record.load), named by the image id
        calls.append(kwargs["name"])
        return original(data, **kwargs)

    monkeypatch.setattr(extract_module, "decode_image", counting)
    plan, result = _extract(manifest, tmp_path, models=["dinov2-tiny", "clip-tiny", "dinov3-tiny"])
    assert len(result["stores"]) == 3 and all(s["complete"] for s in result["stores"])
    assert sorted(calls) == sorted(r.id for r in plan.records)
