"""The CUDA paths against the CPU ones, on tiny models (``pytest -m gpu``; skipped without CUDA).

- extraction on CUDA (pinned inputs, autocast, storage cast on the device, double-buffered
  side-stream copies, the float16 range check on the device) gives the rows ``Encoder.run``
  gives on the CPU in fp32, within the tolerance of the precision and storage dtype;
- a cached FFM + TLT fit on CUDA (bf16 autocast) gives the CPU fit's losses within bf16's;
- the VFM Stitch Tree on CUDA equals the separately stitched models on CUDA.

``benchmarks/gpu_check.py`` runs this file first on a machine with a GPU.
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_tree import BRANCHES, POSITION, TRUNK, runs  # noqa: F401  (runs: the fit fixture)

import featcache
from featcache.demo_data import make_demo_dataset
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.images import decode_image
from featcache.store import FeatureStore
from stitchtrain.model.stitches import build_stitch
from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig
from stitchtrain.tree.model import VFMStitchTree

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
# (max |error| / max |reference|, mean |error| / mean |reference|) per compute precision;
# CUDA fp32 convolutions may use TF32 (10 mantissa bits), bf16 keeps 8 bits, fp16 11
TOLERANCE = {"fp32": (1e-2, 2e-3), "bf16": (5e-2, 2e-2), "fp16": (1e-2, 5e-3)}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("gpu"), num_classes=2, per_class=7)


def _assert_close(stored: np.ndarray, reference: np.ndarray, precision: str, name: str) -> None:
    largest, mean = TOLERANCE[precision]
    error = np.abs(stored - reference)
    assert stored.shape == reference.shape, name
    assert np.isfinite(stored).all(), name
    assert error.max() <= largest * np.abs(reference).max(), (name, error.max())
    assert error.mean() <= mean * np.abs(reference).mean(), (name, error.mean())


# -- extraction -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family_id, precision, dtype",
    [
        ("dinov2", "fp32", "float32"),
        ("dinov2", "bf16", "float16"),
        ("dinov2", "bf16", "bfloat16"),
        ("dinov3", "bf16", "float16"),
        ("clip-open_clip", "fp16", "float32"),
        ("siglip2", "bf16", "float16"),
    ],
)
def test_cuda_extraction_rows_equal_encoder_run_on_cpu(
    tmp_path, manifest, encoder_cache, family_id, precision, dtype
):
    encoder = encoder_cache(family_id)  # on the CPU
    on_cuda = copy.deepcopy(encoder).to(CUDA)
    layers = sorted({0, 1, encoder.depth // 2, encoder.depth})
    config = ExtractConfig(
        models=[encoder.name],
        data=str(manifest),
        out=str(tmp_path),
        layers=layers,
        split="train",
        shard_size=5,
        batch_size=3,
        device="cuda",
        dtype=dtype,
        precision=precision,
    )  # fmt: skip  (shards of 5 in batches of 3 and 2: both staging slots, partial batches)
    plan = plan_extraction(config, encoders=[on_cuda])
    run_extraction(plan)
    store = FeatureStore.open(plan.urls[0])
    assert store.attrs["precision"] == precision and store.verify() == []
    error = store.attrs["precision_error"]
    assert (error["max_abs"] > 0) == (precision != "fp32")
    images = torch.stack([encoder.preprocess(decode_image(r.path)) for r in plan.records])
    with torch.no_grad():
        final, pooled = encoder.run_from(encoder.run(images, upto=0), 0)
        expected = {f"layers/{n}": encoder.run(images, upto=n) for n in layers}
    expected.update(final=final, pooled=pooled)
    for name, reference in expected.items():
        _assert_close(store.read(name), reference.numpy(), precision, name)


def test_cuda_float16_overflow_is_refused_on_the_device_check(tmp_path, manifest):
    encoder = featcache.load_encoder("dinov2-tiny", device=CUDA)
    with torch.no_grad():
        encoder.module.blocks[0].mlp.fc2.bias[3] = 1e6  # one channel of every token explodes
    encoder._fingerprint = None
    config = ExtractConfig(
        models=[encoder.name], data=str(manifest), out=str(tmp_path), layers=[6],
        split="train", shard_size=5, batch_size=3, device="cuda", precision="fp32",
    )  # fmt: skip
    with pytest.raises(FeatcacheError, match=r"float16's max 65504.*--dtype bfloat16"):
        run_extraction(plan_extraction(config, encoders=[encoder]))


# -- training -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory, manifest):
    """{(model, split): url}: float32 stores extracted on the CPU in fp32 (exact inputs)."""
    root = tmp_path_factory.mktemp("gpu-stores")
    urls = {}
    models = ["dinov2-tiny", "clip-tiny"]
    for split in ("train", "test"):
        config = ExtractConfig(
            models=models, data=str(manifest), out=str(root), layers=[2], split=split,
            dtype="float32", device="cpu", shard_size=8,
        )  # fmt: skip
        plan = plan_extraction(config)
        run_extraction(plan)
        urls.update({(m, split): u for m, u in zip(models, plan.urls, strict=True)})
    return urls


def test_cached_ffm_tlt_fit_on_cuda_gives_the_cpu_losses(stores, tmp_path):
    histories = {}
    for device in ("cpu", "cuda"):
        config = FitConfig(
            source=stores["dinov2-tiny", "train"], target=stores["clip-tiny", "train"],
            position=2, out=str(tmp_path / device), objective="ffm+tlt", stitch="mlp",
            lrs=(1e-3,), epochs=2, batch_size=4, device=device,
        )  # fmt: skip
        fit(config)
        with open(tmp_path / device / "history.csv", newline="") as handle:
            histories[device] = list(csv.DictReader(handle))
    cpu, cuda = histories["cpu"], histories["cuda"]
    assert [(r["stage"], r["epoch"]) for r in cpu] == [(r["stage"], r["epoch"]) for r in cuda]
    for expected, got in zip(cpu, cuda, strict=True):
        for key in ("train_loss", "val_loss"):
            # bf16 autocast on CUDA against fp32 on the CPU, a few steps in: a few percent
            assert float(got[key]) == pytest.approx(float(expected[key]), rel=5e-2), (cpu, cuda)


# -- the tree -------------------------------------------------------------------------------------
def _separately_on_cuda(run_dir, target: str, kind: str, images: torch.Tensor):
    """``test_tree._separately`` on CUDA: trunk 1..n, stitch, target n+1..N, one run dir."""
    trunk = featcache.load_encoder(TRUNK, device=CUDA)
    encoder = featcache.load_encoder(target, device=CUDA)
    stitch = build_stitch(
        kind, source=trunk.layout, target=encoder.layout, source_width=trunk.width,
        target_width=encoder.width, source_encoder=trunk if kind == "lora" else None,
        position=POSITION, lora_rank=4,
    ).to(CUDA)  # fmt: skip
    stitch.load_state_dict(load_file(str(run_dir / "stitch.safetensors")))
    source_layer = trunk.run(images, upto=POSITION - 1 if kind == "lora" else POSITION)
    return encoder.run_from(stitch(source_layer), POSITION)


@torch.no_grad()
def test_tree_on_cuda_equals_separate_stitched_models_on_cuda(runs):  # noqa: F811
    trunk = featcache.load_encoder(TRUNK, device=CUDA)
    images = torch.randn(3, 3, *trunk.image_size, generator=torch.Generator().manual_seed(0))
    images = images.to(CUDA)
    tree = VFMStitchTree.from_runs(trunk, POSITION, list(runs.values()), device=CUDA)
    outputs = tree(images)
    assert list(outputs) == [TRUNK, *BRANCHES]
    trunk_final, trunk_pooled = trunk(images)
    torch.testing.assert_close(outputs[TRUNK][0], trunk_final)
    torch.testing.assert_close(outputs[TRUNK][1], trunk_pooled)
    cpu_tree = VFMStitchTree.from_runs(featcache.load_encoder(TRUNK), POSITION, list(runs.values()))
    on_cpu = cpu_tree(images.cpu())
    for target, kind in BRANCHES.items():
        final, pooled = _separately_on_cuda(runs[target], target, kind, images)
        assert outputs[target][0].device.type == "cuda", target
        torch.testing.assert_close(outputs[target][0], final, msg=target)
        torch.testing.assert_close(outputs[target][1], pooled, msg=target)
        # and the CUDA tree is the CPU tree (fp32; TF32 convolutions allowed for)
        reference = on_cpu[target][0]
        error = (outputs[target][0].cpu() - reference).abs().max()
        assert error <= 5e-3 * reference.abs().max(), target
