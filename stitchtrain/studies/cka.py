"""Linear CKA between the layers of two feature stores, out of core (Kornblith et al. 2019).

features    each image's layer tokens ``(T, D)`` become one vector: the mean over tokens
            ("mean", the default), the CLS token ("cls"), or every token concatenated
            ("flatten", T*D values). "final" and "pooled" are accepted as layer names too.
linear CKA  with X ``(n, d_x)`` and Y ``(n, d_y)`` centred over the n images,
                CKA(X, Y) = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)
            feature form: X^T Y = sum over image chunks of X_c^T Y_c, minus n mu_x mu_y^T, in
            float64, so one pass reads each array once whatever the number of layer pairs.
            Gram form (the same number): <HKH, HLH>_F / (||HKH||_F ||HLH||_F), K = X X^T
            ``(n, n)``, H the centring matrix; used when a feature width exceeds n ("flatten").
minibatch   the unbiased estimator of Nguyen, Raghu & Kornblith (2021) over minibatches of b
            images (consecutive store rows: stores already hold a seeded random order):
                CKA_mb = sum_i HSIC_1(K_i, L_i)
                         / sqrt(sum_i HSIC_1(K_i, K_i) sum_i HSIC_1(L_i, L_i))
            with Song et al.'s (2012) unbiased HSIC_1 (below); memory b^2 for any n and width.

Stores are read with ``dask.array.from_zarr`` in chunks of ``chunk_images`` rows, restricted to
rows valid in both stores. The two stores must hold the same images in the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback

from featcache.errors import FeatcacheError
from featcache.store import FeatureStore, bfloat16_bits_to_float32
from stitchtrain.data.loader import valid_rows
from stitchtrain.data.names import encoder_label

__all__ = [
    "TOKEN_MODES",
    "CKAResult",
    "linear_cka",
    "minibatch_cka",
    "hsic1",
    "store_features",
    "cka_matrix",
    "cka_stores",
    "parse_layers",
    "cka_heatmap",
    "plot_cka",
]

TOKEN_MODES = ("mean", "cls", "flatten")
MAX_GRAM_IMAGES = 30_000  # the Gram form holds (n, n) float64 matrices in memory


# -- in-memory definitions (the reference the out-of-core path is tested against) ---------------
def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``(n, d_x)`` and ``(n, d_y)`` features, in memory (float64)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    if max(x.shape[1], y.shape[1]) > len(x):  # the same number from (n, n) Gram matrices
        k, l_ = x @ x.T, y @ y.T
        return float((k * l_).sum() / (np.linalg.norm(k) * np.linalg.norm(l_)))
    cross = np.linalg.norm(x.T @ y) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def hsic1(gram_k: np.ndarray, gram_l: np.ndarray) -> float:
    """Unbiased HSIC_1 of two ``(b, b)`` Gram matrices (Song et al. 2012), b > 3:

    HSIC_1 = [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((b-1)(b-2)) - 2/(b-2) 1^T K~ L~ 1] / (b(b-3)),
    K~, L~ the Gram matrices with their diagonals set to zero.
    """
    b = gram_k.shape[0]
    if b < 4:
        raise ValueError(f"Expected a minibatch of at least 4 images. Got {b} instead.")
    k = np.array(gram_k, np.float64, copy=True)
    l_ = np.array(gram_l, np.float64, copy=True)
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    trace = float((k * l_.T).sum())
    sums = float(k.sum()) * float(l_.sum()) / ((b - 1) * (b - 2))
    cross = float(k.sum(0) @ l_.sum(1)) * 2.0 / (b - 2)
    return (trace + sums - cross) / (b * (b - 3))


def minibatch_cka(x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """The unbiased minibatch CKA of ``(n, d)`` features over consecutive batches, in memory."""
    xy = xx = yy = 0.0
    for start in range(0, len(x), batch_size):
        bx = np.asarray(x[start : start + batch_size], np.float64)
        by = np.asarray(y[start : start + batch_size], np.float64)
        if len(bx) < 4:
            continue
        k, l_ = bx @ bx.T, by @ by.T
        xy, xx, yy = xy + hsic1(k, l_), xx + hsic1(k, k), yy + hsic1(l_, l_)
    return float(xy / np.sqrt(xx * yy))


# -- out of core ----------------------------------------------------------------------------------
def parse_layers(text: str | None) -> list[str] | None:
    """ "2,6,final" -> ["2", "6", "final"]; None or "" -> None (every stored layer)."""
    if not text:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if not (name.isdigit() or name in ("final", "pooled")):
            raise FeatcacheError(
                f"Expected --layers as comma-separated layer numbers, 'final' or 'pooled' "
                f"(e.g. 2,6,final). Got {name!r} instead."
            )
    return names


def _array_name(layer: str | int) -> str:
    layer = str(layer)
    return f"layers/{layer}" if layer.isdigit() else layer


def store_features(
    store: FeatureStore,
    layer: str | int,
    *,
    tokens: str = "mean",
    rows: np.ndarray | None = None,
    chunk_images: int = 64,
) -> da.Array:
    """One vector per image of a store's layer, as a lazy ``(n, d)`` float64 dask array."""
    if tokens not in TOKEN_MODES:
        raise FeatcacheError(f"Expected --tokens in {TOKEN_MODES}. Got {tokens!r} instead.")
    name = _array_name(layer)
    if name not in store.feature_arrays():
        raise FeatcacheError(
            f"Store {store.url} has no {name!r}. It holds: {', '.join(store.feature_arrays())}."
        )
    store.prove(name)  # dask reads through zarr: every marked shard proven against its marker
    array = store.group[name]
    stored = da.from_zarr(array, chunks=(chunk_images, *array.shape[1:]))
    if store.attrs.get("logical_dtype") == "bfloat16":
        stored = stored.map_blocks(bfloat16_bits_to_float32, dtype=np.float32)
    if rows is not None and len(rows) != stored.shape[0]:
        stored = stored[np.asarray(rows)]
    if stored.ndim == 2:  # pooled: already one vector per image
        return stored.astype(np.float64)
    if tokens == "mean":
        return stored.mean(axis=1, dtype=np.float64)  # (n, D)
    if tokens == "cls":
        if "cls" not in store.attrs["encoder"]["layout"]["prefix"]:
            raise FeatcacheError(
                f"{store.attrs['encoder']['name']} ({store.url}) has no CLS token. Use --tokens "
                "mean or flatten."
            )
        index = store.attrs["encoder"]["layout"]["prefix"].index("cls")
        return stored[:, index].astype(np.float64)  # (n, D)
    n, t, d = stored.shape
    return stored.reshape(n, t * d).astype(np.float64)  # (n, T*D)


def _feature_form(features_a, features_b) -> np.ndarray:
    n = features_a[0].shape[0]
    sums_a = [f.sum(axis=0) for f in features_a]
    sums_b = [f.sum(axis=0) for f in features_b]
    grams_a = [f.T @ f for f in features_a]
    grams_b = [f.T @ f for f in features_b]
    cross = [[fa.T @ fb for fb in features_b] for fa in features_a]
    sums_a, sums_b, grams_a, grams_b, cross = dask.compute(sums_a, sums_b, grams_a, grams_b, cross)

    def centred(product, sum_x, sum_y):  # X_c^T Y_c = X^T Y - (sum x)(sum y)^T / n
        return product - np.outer(sum_x, sum_y) / n

    norm_a = [np.linalg.norm(centred(g, s, s)) for g, s in zip(grams_a, sums_a, strict=True)]
    norm_b = [np.linalg.norm(centred(g, s, s)) for g, s in zip(grams_b, sums_b, strict=True)]
    values = np.empty((len(features_a), len(features_b)))
    for i, (sum_x, norm_x) in enumerate(zip(sums_a, norm_a, strict=True)):
        for j, (sum_y, norm_y) in enumerate(zip(sums_b, norm_b, strict=True)):
            values[i, j] = np.linalg.norm(centred(cross[i][j], sum_x, sum_y)) ** 2 / (
                norm_x * norm_y
            )
    return values


def _centre_gram(gram: np.ndarray) -> np.ndarray:
    """H K H for K = X X^T: the Gram matrix of the centred features."""
    return gram - gram.mean(0) - gram.mean(1)[:, None] + gram.mean()


def _gram_form(features_a, features_b) -> np.ndarray:
    n = features_a[0].shape[0]
    if n > MAX_GRAM_IMAGES:
        raise FeatcacheError(
            f"The exact CKA of features wider than the {n} images holds {n}x{n} matrices; "
            f"expected at most {MAX_GRAM_IMAGES} images. Use the minibatch estimator "
            "(--minibatch 256), --tokens mean, or --max-images."
        )
    grams_a, grams_b = dask.compute([f @ f.T for f in features_a], [f @ f.T for f in features_b])
    grams_a = [_centre_gram(g) for g in grams_a]
    grams_b = [_centre_gram(g) for g in grams_b]
    values = np.empty((len(grams_a), len(grams_b)))
    for i, k in enumerate(grams_a):
        for j, l_ in enumerate(grams_b):
            values[i, j] = (k * l_).sum() / (np.linalg.norm(k) * np.linalg.norm(l_))
    return values


def _block_hsic(blocks_a: list[np.ndarray], blocks_b: list[np.ndarray]):
    """HSIC_1 terms of one minibatch: (cross (La, Lb), diag a (La,), diag b (Lb,))."""
    grams_a = [block @ block.T for block in blocks_a]
    grams_b = [block @ block.T for block in blocks_b]
    cross = np.array([[hsic1(k, l_) for l_ in grams_b] for k in grams_a])
    return cross, np.array([hsic1(k, k) for k in grams_a]), np.array([hsic1(g, g) for g in grams_b])


def _minibatch_form(features_a, features_b, batch_size: int) -> np.ndarray:
    if batch_size < 4:
        raise FeatcacheError(f"Expected --minibatch of at least 4. Got {batch_size} instead.")
    n = features_a[0].shape[0]
    if n < 4:
        raise FeatcacheError(f"The minibatch estimator needs at least 4 images. Got {n}.")
    rechunked = [f.rechunk((batch_size, -1)) for f in [*features_a, *features_b]]
    blocks = [f.to_delayed().ravel() for f in rechunked]  # per layer: one delayed per batch
    sizes = rechunked[0].chunks[0]
    blocks_a, blocks_b = blocks[: len(features_a)], blocks[len(features_a) :]
    terms = [
        dask.delayed(_block_hsic)([b[k] for b in blocks_a], [b[k] for b in blocks_b])
        for k, size in enumerate(sizes)
        if size >= 4  # an unbiased HSIC needs 4 images; a short last batch is dropped
    ]
    totals = dask.compute(*terms)
    cross = sum(t[0] for t in totals)
    diag_a = sum(t[1] for t in totals)
    diag_b = sum(t[2] for t in totals)
    return cross / np.sqrt(np.outer(diag_a, diag_b))


def cka_matrix(
    features_a: list[da.Array],
    features_b: list[da.Array],
    *,
    minibatch: int | None = None,
    form: str = "auto",
) -> np.ndarray:
    """CKA of every pair (``features_a[i]``, ``features_b[j]``) of ``(n, d)`` dask arrays.

    ``minibatch`` b: the unbiased minibatch estimator; otherwise exact linear CKA in the
    feature form, or the Gram form when a width exceeds n (``form`` forces either).
    """
    if not features_a or not features_b:
        raise FeatcacheError("Expected at least one layer on each side. Got none.")
    counts = {f.shape[0] for f in [*features_a, *features_b]}
    if len(counts) != 1:
        raise FeatcacheError(f"Expected features of the same images. Got row counts {counts}.")
    if minibatch is not None:
        return _minibatch_form(features_a, features_b, minibatch)
    if form not in ("auto", "features", "gram"):
        raise ValueError(f"Expected form auto, features or gram. Got {form!r} instead.")
    widest = max(f.shape[1] for f in [*features_a, *features_b])
    use_gram = form == "gram" or (form == "auto" and widest > counts.pop())
    return _gram_form(features_a, features_b) if use_gram else _feature_form(features_a, features_b)


@dataclass
class CKAResult:
    """CKA values ``(len(layers_a), len(layers_b))`` between two stores' layers; the stores
    by URL, their encoders by the name a user reads (``names.encoder_label``: a hybrid by its
    label)."""

    store_a: str
    store_b: str
    encoder_a: str
    encoder_b: str
    layers_a: list[str]
    layers_b: list[str]
    values: list[list[float]]
    tokens: str
    estimator: str  # "linear" or "minibatch:<b>"
    images: int

    def value(self, layer_a: str | int, layer_b: str | int) -> float:
        return self.values[self.layers_a.index(str(layer_a))][self.layers_b.index(str(layer_b))]

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write cka.json, cka.csv (long form) and cka.png (heatmap) under ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cka.json").write_text(json.dumps(asdict(self), indent=2))
        lines = ["layer_a,layer_b,cka"]
        for i, layer_a in enumerate(self.layers_a):
            for j, layer_b in enumerate(self.layers_b):
                lines.append(f"{layer_a},{layer_b},{self.values[i][j]!r}")
        (out / "cka.csv").write_text("\n".join(lines) + "\n")
        return {
            "json": out / "cka.json",
            "csv": out / "cka.csv",
            "png": plot_cka(self, out / "cka.png"),
        }


def _dask_progress(progress: Callable[[str, int, int], None] | None, step: str) -> Callback:
    """A dask callback (for the local schedulers) calling ``progress(step, tasks done,
    tasks)`` as each task of the computes inside its block finishes (counted over them all)."""
    count = {"done": 0, "total": 0}

    def start_state(dsk, state) -> None:
        count["done"] += len(state["finished"])
        count["total"] += len(state["finished"])
        count["total"] += sum(len(state[k]) for k in ("ready", "waiting", "running"))
        progress(step, count["done"], count["total"])

    def posttask(key, result, dsk, state, worker_id) -> None:
        count["done"] += 1
        progress(step, count["done"], count["total"])

    return Callback() if progress is None else Callback(start_state=start_state, posttask=posttask)


def cka_stores(
    store_a: str | FeatureStore,
    store_b: str | FeatureStore,
    layers_a: list[str | int] | None = None,
    layers_b: list[str | int] | None = None,
    *,
    tokens: str = "mean",
    minibatch: int | None = None,
    max_images: int | None = None,
    chunk_images: int = 64,
    allow_geometry_mismatch: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> CKAResult:
    """CKA between layers of two paired stores (default: every stored layer of each).

    The stores must hold the same images in the same rows (``pairing.check_same_images``: ids
    and row digests) and see the same pixels (``pairing.check_geometry``) unless
    ``allow_geometry_mismatch``. ``progress(step, done, total)`` is called as the dask tasks
    that read and reduce the arrays finish (``step`` names the computation)."""
    from stitchtrain.data.pairing import check_geometry, check_same_images

    a = store_a if isinstance(store_a, FeatureStore) else FeatureStore.open(store_a)
    b = store_b if isinstance(store_b, FeatureStore) else FeatureStore.open(store_b)
    check_same_images(a, b)  # CKA compares two encoders on the same images
    check_geometry(a, b, allow_mismatch=allow_geometry_mismatch)
    names_a = [str(x) for x in (layers_a or a.layers)]
    names_b = [str(x) for x in (layers_b or layers_a or b.layers)]
    rows = valid_rows(a, b)
    if max_images is not None:
        rows = rows[:max_images]
    if len(rows) < 2:
        raise FeatcacheError(f"Expected at least 2 valid images in both stores. Got {len(rows)}.")
    selected = None if len(rows) == a.num_images else rows

    def features(store, names):
        return [
            store_features(store, n, tokens=tokens, rows=selected, chunk_images=chunk_images)
            for n in names
        ]

    step = f"CKA {len(names_a)}x{len(names_b)} layers, {len(rows)} images"
    with _dask_progress(progress, step):
        values = cka_matrix(features(a, names_a), features(b, names_b), minibatch=minibatch)
    return CKAResult(
        store_a=a.url,
        store_b=b.url,
        encoder_a=encoder_label(a.attrs["encoder"]),
        encoder_b=encoder_label(b.attrs["encoder"]),
        layers_a=names_a,
        layers_b=names_b,
        values=values.tolist(),
        tokens=tokens,
        estimator="linear" if minibatch is None else f"minibatch:{minibatch}",
        images=int(len(rows)),
    )


def cka_heatmap(result: CKAResult, names: tuple[str, str] | None = None):
    """The heatmap of a ``CKAResult`` (rows: store A's layers, columns: store B's) as a
    matplotlib ``Figure``. The colours span the values' own range (their minimum to their
    maximum, which the colour bar states), so 0.95 and 0.97 look different; every cell prints
    its value to 3 decimals. ``names``: how to call encoders A and B (default: the stores'
    encoder names)."""
    from matplotlib.figure import Figure

    values = np.asarray(result.values)
    name_a, name_b = names or (result.encoder_a, result.encoder_b)
    low, high = float(values.min()), float(values.max())
    if high > low:
        scale = {"vmin": low, "vmax": high}
        label = f"CKA: colours span the values, {low:.3f}–{high:.3f}"
    else:  # one value everywhere: one colour
        scale = {"vmin": low - 0.5, "vmax": high + 0.5}
        label = f"CKA: all {low:.3f}"
    size = (2.5 + 0.55 * len(result.layers_b), 2.0 + 0.4 * len(result.layers_a))
    figure = Figure(
        figsize=(max(size[0], 4.2), max(size[1], 3.2) + 0.6), dpi=110, layout="constrained"
    )
    axes = figure.subplots()
    image = axes.imshow(values, cmap="magma", origin="lower", aspect="auto", **scale)
    axes.set_xticks(range(len(result.layers_b)), result.layers_b)
    axes.set_yticks(range(len(result.layers_a)), result.layers_a)
    axes.set_xlabel(f"{name_b} layer")
    axes.set_ylabel(f"{name_a} layer")
    fontsize = 7 if max(values.shape) <= 10 else 5
    for (i, j), value in np.ndenumerate(values):
        colour = "black" if image.norm(value) > 0.6 else "white"  # magma: light at the top
        axes.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=fontsize, color=colour)
    axes.set_title(
        f"{result.estimator} CKA, {name_a} vs {name_b}\n({result.tokens} tokens, "
        f"{result.images} images)"
    )
    figure.colorbar(image, ax=axes, label=label, location="bottom", aspect=40)
    return figure


def plot_cka(result: CKAResult, path: str | Path) -> Path:
    """``cka_heatmap`` of ``result`` written to ``path`` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cka_heatmap(result).savefig(path)
    return path
