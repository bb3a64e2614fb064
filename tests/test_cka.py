"""Linear CKA out of core: equal to the in-memory definition, 1 on identical inputs, invariant
to orthogonal transforms and isotropic scaling; the unbiased minibatch estimator."""

from __future__ import annotations

import itertools
import json

import dask.array as da
import numpy as np
import pytest
from conftest import extract_demo_stores
from PIL import Image
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.studies.cka import (
    cka_matrix,
    cka_stores,
    hsic1,
    linear_cka,
    minibatch_cka,
    store_features,
)

runner = CliRunner()
MODELS = ["dinov2-tiny", "siglip2-tiny"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url}; 3 classes x 8 images, layers 1-3, two shards per train store."""
    root = tmp_path_factory.mktemp("cka")
    return extract_demo_stores(
        root / "data", root / "stores", models=MODELS, layers=[1, 2, 3], shard_size=8
    )


def _gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its HSIC definition: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def _features(store: FeatureStore, layer: str, tokens: str) -> np.ndarray:
    name = f"layers/{layer}" if layer.isdigit() else layer
    values = store.read(name).astype(np.float64)
    if values.ndim == 2:
        return values
    if tokens == "mean":
        return values.mean(1)
    if tokens == "cls":
        return values[:, 0]
    return values.reshape(len(values), -1)


@pytest.mark.parametrize("tokens", ["mean", "cls", "flatten"])
def test_store_cka_equals_in_memory_computation(stores, tokens):
    a = FeatureStore.open(stores["dinov2-tiny", "train"])
    b = FeatureStore.open(stores["siglip2-tiny", "train"])
    layers_a, layers_b = ["1", "2", "3", "final"], ["1", "3", "pooled"]
    if tokens == "cls":
        b = FeatureStore.open(stores["dinov2-tiny", "train"])  # SigLIP2 has no CLS token
    result = cka_stores(a, b, layers_a, layers_b, tokens=tokens, chunk_images=5)
    assert result.images == a.num_images == 18
    for (i, la), (j, lb) in itertools.product(enumerate(layers_a), enumerate(layers_b)):
        x, y = _features(a, la, tokens), _features(b, lb, tokens)
        assert result.values[i][j] == pytest.approx(_gram_cka(x, y), rel=1e-9)
        if tokens != "flatten":  # the feature form's (d, d) matrices are large for flatten
            assert result.values[i][j] == pytest.approx(linear_cka(x, y), rel=1e-9)
    if tokens == "flatten":
        return
    # 18 images < width: "auto" took the Gram form; the feature form gives the same numbers
    features = [store_features(a, "2", tokens=tokens, chunk_images=5)]
    other = [store_features(b, "pooled", tokens=tokens, chunk_images=5)]
    assert cka_matrix(features, other, form="features")[0, 0] == pytest.approx(
        result.value("2", "pooled"), rel=1e-9
    )


def test_cka_of_identical_inputs_is_one(stores):
    url = stores["siglip2-tiny", "train"]
    result = cka_stores(url, url, ["1", "2", "3", "final"])
    np.testing.assert_allclose(np.diag(result.values), 1.0, rtol=1e-12)
    values = np.asarray(result.values)
    np.testing.assert_allclose(values, values.T, rtol=1e-12)
    assert (values <= 1 + 1e-12).all()
    minibatch = cka_stores(url, url, ["2"], minibatch=6)
    assert minibatch.values[0][0] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("form", ["features", "gram", "minibatch"])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(form):
    generator = np.random.default_rng(0)
    x = generator.normal(size=(40, 12))
    y = x[:, :7] @ generator.normal(size=(7, 9)) + 0.5 * generator.normal(size=(40, 9))
    rotation, _ = np.linalg.qr(generator.normal(size=(12, 12)))  # orthogonal
    transformed = 3.7 * x @ rotation + 0.0

    def cka(first, second):
        first, second = da.from_array(first, chunks=(7, -1)), da.from_array(second, chunks=(9, -1))
        if form == "minibatch":
            return cka_matrix([first], [second], minibatch=10)[0, 0]
        return cka_matrix([first], [second], form=form)[0, 0]

    reference = cka(x, y)
    assert 0.2 < reference < 0.99
    assert cka(transformed, y) == pytest.approx(reference, rel=1e-10)
    assert cka(x, 0.01 * y) == pytest.approx(reference, rel=1e-10)
    assert cka(x, x @ rotation) == pytest.approx(1.0, rel=1e-10)
    # not invariant to a general (anisotropic) linear map: the test can fail
    stretched = x * np.linspace(0.1, 5.0, 12)
    assert abs(cka(stretched, y) - reference) > 1e-3


def test_unbiased_hsic_matches_its_u_statistic_and_minibatch_matches_reference():
    generator = np.random.default_rng(1)
    x, y = generator.normal(size=(6, 3)), generator.normal(size=(6, 4))
    k, l_ = x @ x.T, y @ y.T
    total = 0.0
    tuples = list(itertools.permutations(range(6), 4))
    for i, j, q, r in tuples:  # Song et al. (2012): HSIC_1 as a U-statistic
        total += k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
    assert hsic1(k, l_) == pytest.approx(total / len(tuples), rel=1e-10)

    x, y = generator.normal(size=(50, 5)), generator.normal(size=(50, 8))
    dask_value = cka_matrix(
        [da.from_array(x, chunks=(13, -1))], [da.from_array(y, chunks=(50, -1))], minibatch=16
    )[0, 0]
    # 50 = 3 x 16 + 2: the 2-image remainder is left out of both
    assert dask_value == pytest.approx(minibatch_cka(x[:48], y[:48], 16), rel=1e-12)


def test_cka_refuses_unpaired_stores_and_bad_options(stores):
    with pytest.raises(FeatcacheError, match="different images"):
        cka_stores(stores["dinov2-tiny", "train"], stores["siglip2-tiny", "test"])
    with pytest.raises(FeatcacheError, match="no CLS"):
        cka_stores(stores["siglip2-tiny", "train"], stores["dinov2-tiny", "train"], tokens="cls")
    with pytest.raises(FeatcacheError, match="layers/7"):
        cka_stores(stores["dinov2-tiny", "train"], stores["siglip2-tiny", "train"], ["7"])


def test_cli_cka_writes_heatmap(stores, tmp_path):
    result = runner.invoke(
        experiments_app,
        [
            "cka",
            stores["dinov2-tiny", "train"],
            stores["siglip2-tiny", "train"],
            "--layers",
            "1,2,3,final",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "linear CKA" in result.output and "final" in result.output
    saved = json.loads((tmp_path / "cka.json").read_text())
    assert len(saved["values"]) == 4 and len(saved["values"][0]) == 4
    image = np.asarray(Image.open(tmp_path / "cka.png").convert("RGB"))
    assert image.shape[0] > 100 and image.std() > 10  # a picture, not a blank canvas
    result = runner.invoke(
        experiments_app,
        ["cka", stores["dinov2-tiny", "train"], stores["dinov2-tiny", "train"], "--layers", "2,x"],
    )
    assert result.exit_code == 2 and "--layers" in result.output
