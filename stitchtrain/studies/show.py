"""How a stitch changes the patch-token picture (``stitchtrain show``).

For a fitted run dir and I images of its test stores (its train stores when the run has no
test split), one figure row per image, left to right:
    input      the image as the target saw it (``featcache.show.ModelInputs``)
    source     the stored source tokens the stitch reads (layer n; layer n-1 for a LoRA
               stitch), PCA -> RGB on the source grid, with its own basis
    stitched   T(S(source)).final: the stored source tokens through the trained stitch and
               the frozen target tail (blocks n+1..N and the final norm, ``StitchRecipe.
               stitched_outputs``), PCA -> RGB on the target grid
    target     the target's own final tokens, read from the target store, PCA -> RGB
    cosine     per patch, cos(stitched_p, target_p) = <s, t> / (|s| |t|), in [-1, 1], drawn with
               a diverging colour map fixed to [-1, 1] and a colour bar
The stitched and target maps share one PCA basis, fitted on the target's own final patch
tokens of the shown images (``featcache.show.PcaBasis``: mean, 3 directions, the scaling to
[0, 1]), so a colour means the same feature direction in both; the stitched tokens are only
projected and scaled with it (clipped to [0, 1]). The source map has its own basis (another
model, another width). Shapes: source ``(I, Ps, Ds)``, stitched and target ``(I, Pt, Dt)``
patch tokens (prefix tokens dropped) -> maps ``(I, rows, cols, 3)``; cosine ``(I, rows, cols)``.

No image passes through an encoder: source features and target finals are the stores'
arrays, and only the target tail runs, on stitched stored features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from featcache.show import (
    SCALES,
    FeatureFigure,
    GridLayout,
    ModelInputs,
    ShowError,
    dataset_title,
    draw_image,
    grid_of,
    label_row,
    panel_grid,
    pca_maps,
    require_tokens,
    select_rows,
    upsample_nearest,
)
from featcache.store import FeatureStore
from stitchtrain.data.loader import valid_rows
from stitchtrain.data.pairing import PairingError, check_same_images, source_array

__all__ = ["COSINE_RANGE", "show_run", "patch_cosine"]

COSINE_RANGE = (-1.0, 1.0)
_BATCH = 16  # images per stitched forward


def patch_cosine(stitched: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(I, P, D)`` x ``(I, P, D)`` -> ``(I, P)`` cosine similarity per patch (0 where either
    token is zero)."""
    s, t = np.asarray(stitched, np.float64), np.asarray(target, np.float64)
    norms = np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1)
    dots = (s * t).sum(-1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)


def _stores(recipe) -> tuple[FeatureStore, FeatureStore, str]:
    """(source, target, split): the run's test stores (refused unless they pair), else its
    train stores."""
    from stitchtrain.evaluate.evaluation import find_test_stores

    try:
        source, target = find_test_stores(recipe)
    except PairingError:
        return recipe.source, recipe.target, "train"
    check_same_images(source, target)
    return source, target, "test"


@torch.no_grad()
def stitched_finals(recipe, tokens: np.ndarray) -> np.ndarray:
    """``(I, Ts, Ds)`` stored source tokens -> ``(I, Tt, Dt)`` float32 stitched final tokens."""
    recipe.stitch.eval()
    out = []
    for start in range(0, len(tokens), _BATCH):
        batch = torch.from_numpy(tokens[start : start + _BATCH]).to(recipe.device)
        with recipe.autocast:
            final, _ = recipe.stitched_outputs(batch)
        out.append(final.float().cpu().numpy())
    return np.concatenate(out)


def show_run(
    run_dir: str | Path,
    *,
    images: int | None = 8,
    rows: Sequence[int] | None = None,
    scale: str = "percentile",
    device: str = "auto",
    data: str | None = None,
) -> FeatureFigure:
    """The figure of the module doc for a finished run dir (``evaluate.load_run`` reopens it:
    stitch weights and the frozen target encoder, whose tail alone runs).

    ``rows``: store rows to show (default: the first ``images`` rows valid in both stores);
    ``data``: where the stores' dataset is now, when it has moved (``featcache.show.
    ModelInputs``: checked against the target store's manifest hash; the paired stores share
    it). Rows are labelled with their class, image id and mean cosine.
    The returned ``FeatureFigure.maps`` holds each column's maps, ``extra["cosine"]`` the
    ``(I, rows, cols)`` cosine map and ``extra["basis"]`` the shared target basis.
    """
    from stitchtrain.evaluate.evaluation import load_run

    if scale not in SCALES:
        raise ShowError(f"Expected --scale in {SCALES}. Got {scale!r} instead.")
    recipe = load_run(run_dir, device=device)
    config = recipe.config
    source, target, split = _stores(recipe)
    for store in (source, target):
        require_tokens(store)
    array = source_array(config.stitch, config.position)
    if array not in source.group:
        raise ShowError(f"The source store {source.url} has no {array!r}, which the stitch reads.")
    chosen = select_rows(valid_rows(source, target), images, rows, target.url)
    source_tokens = source.read(array, chosen)  # (I, Ts, Ds), prefix included: stitch input
    target_final = target.read("final", chosen)  # (I, Tt, Dt)
    for store, name, values in ((source, array, source_tokens), (target, "final", target_final)):
        if not np.isfinite(values).all():
            raise ShowError(f"{store.url}: {name} holds non-finite values; run featcache verify.")
    stitched = stitched_finals(recipe, source_tokens)
    source_prefix = len(source.attrs["encoder"]["layout"]["prefix"])
    target_prefix = len(target.attrs["encoder"]["layout"]["prefix"])
    target_grid = grid_of(target)
    target_patches, stitched_patches = target_final[:, target_prefix:], stitched[:, target_prefix:]

    source_maps, source_basis = pca_maps(source_tokens[:, source_prefix:], grid_of(source), scale)
    target_maps, basis = pca_maps(target_patches, target_grid, scale)
    stitched_maps, _ = pca_maps(stitched_patches, target_grid, basis=basis)
    cosine = patch_cosine(stitched_patches, target_patches).reshape(len(chosen), *target_grid)

    source_name = source.attrs["encoder"]["name"]
    target_name = target.attrs["encoder"]["name"]
    layer = array.split("/", 1)[1]
    maps = {
        f"{source_name} layer {layer}": source_maps,
        f"stitched -> {target_name} final": stitched_maps,
        f"{target_name} final": target_maps,
        "cosine(stitched, target)": cosine,
    }
    inputs = ModelInputs(target, data)
    pictures = [inputs.image(int(row)) for row in chosen]
    title = (
        f"{Path(run_dir).name}: {source_name} -> {target_name} at position {config.position} "
        f"({config.stitch}, {config.objective}), {split} split; stitched and target final "
        f"share the target's PCA basis ({scale} scaled)"
    )
    columns = (f"{target_name} input", *maps)
    layout = GridLayout(
        len(chosen), columns, colorbar=True, title=dataset_title(title, inputs.problem)
    )
    figure, axes, colorbar_axes = panel_grid(layout)
    low, high = COSINE_RANGE
    for index, row in enumerate(chosen.tolist()):
        image, note = pictures[index]
        draw_image(axes[index, 0], image, note, inputs.size)
        mean_cosine = float(cosine[index].mean())
        label_row(axes[index, 0], inputs.caption(row, f"cos {mean_cosine:.2f}"))
        for column, grid_maps in enumerate(list(maps.values())[:3], start=1):
            axes[index, column].imshow(
                upsample_nearest(grid_maps[index], inputs.size), interpolation="nearest"
            )
        drawn = axes[index, 4].imshow(
            upsample_nearest(cosine[index], inputs.size),
            cmap="RdBu_r",
            vmin=low,
            vmax=high,
            interpolation="nearest",
        )
    figure.colorbar(drawn, cax=colorbar_axes).set_label(
        "cosine similarity per patch, stitched vs target final (range -1..1)", fontsize=7
    )
    colorbar_axes.tick_params(labelsize=7)
    return FeatureFigure.drawn(
        figure,
        layout,
        chosen,
        maps,
        pictures,
        {
            "cosine": cosine,
            "basis": basis,
            "source_basis": source_basis,
            "split": split,
            "source_store": source.url,
            "target_store": target.url,
            "source_array": array,
        },
        inputs.problem,
    )
