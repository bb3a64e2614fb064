"""Pictures of stored patch tokens: PCA of a store's token arrays as RGB (``featcache show``).

Everything is computed from the store's arrays; no encoder is loaded or run.

PCA to RGB, for one set of maps (one layer of the shown images):
    X    (I * P, D)   patch tokens of I images, P = rows * cols patches each, prefix tokens
                      (CLS, registers; the store's ``encoder.layout.prefix``) dropped
    mu   (D,)         mean of X over its rows;  Xc = X - mu
    V    (D, 3)       the eigenvectors of the three largest eigenvalues of Xc^T Xc (float64;
                      the first three right singular vectors of Xc, without an SVD of the
                      (I * P, D) matrix), each column's sign chosen so its largest-magnitude
                      loading is positive (the signs are arbitrary; this makes colours repeatable)
    Z    (I * P, 3)   Xc V: the three principal-component scores
    lo, hi  (3,)      per component, the 1st and 99th percentile of Z[:, k] ("percentile",
                      robust to the few huge "massive activation" tokens) or its min and max
                      ("minmax"), over all shown images at once
    RGB  (I, rows, cols, 3) = clip((Z - lo) / (hi - lo), 0, 1) reshaped; component k is
                      channel k (red = first principal component)
The basis is fitted jointly over the shown images, so one colour means one direction of
feature space in every row of a column. ``PcaBasis`` keeps (mu, V, lo, hi), so tokens of the
same width can be coloured with a basis fitted on others (``stitchtrain.studies.show`` colours
stitched tokens with the target's own basis).

The figure (``FeatureFigure``): one row per image; first panel the image as the model saw it,
re-created from the store's dataset record (``dataset.source`` reloaded, the row's id looked
up) and the store's recorded preprocessing (input size, resize mode, crop, interpolation;
``Preprocessing`` applied, then its normalisation undone), or a blank panel with a note when
the image cannot be read; then one PCA map per chosen array, on the token grid, upsampled
nearest-neighbour to the image panel's size. Panels are ``PANEL_PX`` pixels square at
``DPI``; ``panel_grid`` fixes every margin in pixels, so the PNG's size follows from the
grid (``GridLayout.size_px``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from featcache.store import FeatureStore

__all__ = [
    "SCALES",
    "ShowError",
    "PcaBasis",
    "GridLayout",
    "FeatureFigure",
    "ModelInputs",
    "patch_tokens",
    "select_rows",
    "upsample_nearest",
    "panel_grid",
    "check_image_path",
    "show_store",
]

SCALES = ("percentile", "minmax")
PERCENTILES = (1.0, 99.0)
DEFAULT_MAX_LAYERS = 4  # default columns: all stored layers up to this many, else spread out
PANEL_PX, GAP_PX, LABEL_PX, TITLE_PX, MARGIN_PX, COLORBAR_PX = 200, 8, 30, 44, 10, 110
DPI = 100


class ShowError(FeatcacheError, ValueError):
    """A request the stored arrays cannot answer (unknown layer, too many images, ...)."""


@dataclass(frozen=True)
class PcaBasis:
    """A 3-component PCA of ``(N, D)`` tokens and the scaling of its scores to [0, 1].

    Attributes:
        mean: ``(D,)`` token mean of the fitted tokens.
        components: ``(D, 3)`` principal directions (columns), unit length; zero columns when
            the tokens span fewer than 3 directions.
        low, high: ``(3,)`` score values mapped to 0 and 1.
    """

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray, scale: str = "percentile") -> PcaBasis:
        """Fit on ``(N, D)`` tokens (float; computed in float64)."""
        if scale not in SCALES:
            raise ShowError(f"Expected scale in {SCALES}. Got {scale!r} instead.")
        x = np.asarray(tokens, np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ShowError(f"Expected (N, D) tokens with N >= 1. Got shape {x.shape} instead.")
        mean = x.mean(axis=0)
        centred = x - mean
        values, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        order = np.argsort(values)[::-1][: min(3, len(x) - 1)]
        components = np.zeros((x.shape[1], 3))
        components[:, : len(order)] = vectors[:, order]
        biggest = np.argmax(np.abs(components), axis=0)  # (3,) row of each largest loading
        signs = np.sign(components[biggest, np.arange(3)])
        components *= np.where(signs == 0, 1.0, signs)
        scores = centred @ components  # (N, 3)
        if scale == "percentile":
            low, high = np.percentile(scores, PERCENTILES, axis=0)
        else:
            low, high = scores.min(axis=0), scores.max(axis=0)
        return cls(mean, components, low, high)

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        """``(..., D)`` tokens -> ``(..., 3)`` principal-component scores (float64)."""
        return (np.asarray(tokens, np.float64) - self.mean) @ self.components

    def rgb(self, tokens: np.ndarray) -> np.ndarray:
        """``(..., D)`` tokens -> ``(..., 3)`` float32 colours in [0, 1]; a component without
        spread (high == low) is mid-grey."""
        span = self.high - self.low
        scaled = (self.scores(tokens) - self.low) / np.where(span > 0, span, 1.0)
        scaled = np.where(span > 0, scaled, 0.5)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def pca_maps(
    patches: np.ndarray, grid: Sequence[int], scale: str = "percentile", basis=None
) -> tuple[np.ndarray, PcaBasis]:
    """``(I, P, D)`` patch tokens -> (``(I, rows, cols, 3)`` RGB maps, the basis used).

    ``basis`` None: fitted on all I * P tokens (module doc); else that basis colours them.
    """
    images, count, width = patches.shape
    rows, cols = grid
    if count != rows * cols:
        raise ShowError(f"Expected {rows}x{cols} = {rows * cols} patches. Got {count} instead.")
    flat = patches.reshape(images * count, width)
    basis = PcaBasis.fit(flat, scale) if basis is None else basis
    return basis.rgb(flat).reshape(images, rows, cols, 3), basis


def upsample_nearest(grid_map: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(rows, cols, ...)`` -> ``(H, W, ...)`` by nearest neighbour: pixel (y, x) takes cell
    (floor(y * rows / H), floor(x * cols / W))."""
    rows, cols = grid_map.shape[:2]
    height, width = size
    ys = np.arange(height) * rows // height
    xs = np.arange(width) * cols // width
    return grid_map[ys[:, None], xs[None, :]]


# -- reading the store ------------------------------------------------------------------------
def require_tokens(store: FeatureStore) -> None:
    """Refuse a store without patch tokens (``--tokens pooled`` or ``prefix`` extractions)."""
    mode = store.attrs["tokens"]
    if mode != "all":
        what = "pooled features only" if mode == "pooled" else "prefix tokens only"
        raise ShowError(
            f"{store.url} stores {what} "
            f"(extracted with --tokens {mode}): there are no patch tokens to map. Extract with "
            "--tokens all."
        )


def parse_layer(store: FeatureStore, text: str | int) -> str:
    """A ``--layer`` value (a stored layer number, or "final") -> its array name."""
    stored = sorted(store.layers)
    value = str(text).strip()
    if value == "final" or (value.isdigit() and int(value) in stored):
        return "final" if value == "final" else f"layers/{int(value)}"
    raise ShowError(
        f"Expected --layer among the layers {store.url} stores: "
        f"{', '.join(map(str, stored)) or 'none'} or final. Got {value!r} instead."
    )


def default_layers(store: FeatureStore, most: int = DEFAULT_MAX_LAYERS) -> list[str]:
    """Every stored layer when there are at most ``most``, else ``most`` spread evenly from
    the first to the last stored layer; the final tokens when no layer is stored."""
    stored = sorted(store.layers)
    if not stored:
        return ["final"]
    if len(stored) > most:
        picks = np.linspace(0, len(stored) - 1, most).round().astype(int)
        stored = [stored[i] for i in sorted(set(picks.tolist()))]
    return [f"layers/{n}" for n in stored]


def shown_rows(store: FeatureStore) -> np.ndarray:
    """Rows that exist (inside a marked shard) and hold an image (``valid``), ascending."""
    keep = store.marked_mask() & np.asarray(store.read("valid"), bool)
    return np.flatnonzero(keep).astype(np.int64)


def select_rows(
    usable: np.ndarray, images: int | None, rows: Sequence[int] | None, url: str
) -> np.ndarray:
    """``rows`` as given (each must be usable), else the first ``images`` usable rows."""
    if rows:
        chosen = np.asarray(list(rows), np.int64)
        allowed = set(usable.tolist())
        bad = [int(r) for r in chosen.tolist() if r not in allowed]
        if bad:
            raise ShowError(
                f"Expected --rows among the {len(usable)} usable rows of {url} (valid images in "
                f"marked shards: {_row_ranges(usable)}). Got {bad} instead."
            )
        return chosen
    count = 8 if images is None else images
    if count < 1 or count > len(usable):
        raise ShowError(
            f"Expected --images between 1 and {len(usable)} (the usable rows of {url}). Got "
            f"{count} instead."
        )
    return usable[:count]


def _row_ranges(rows: np.ndarray) -> str:
    if len(rows) == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = [rows[0], *rows[breaks + 1]]
    stops = [*rows[breaks], rows[-1]]
    return ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in zip(starts, stops, strict=True))


def patch_tokens(store: FeatureStore, name: str, rows: np.ndarray) -> np.ndarray:
    """``(I, rows * cols, D)`` float32 patch tokens of array ``name`` at store ``rows``: the
    stored tokens less the prefix ones (the first ``len(layout.prefix)``)."""
    prefix = len(store.attrs["encoder"]["layout"]["prefix"])
    values = store.read(name, np.asarray(rows, np.int64))
    if not np.isfinite(values).all():
        raise ShowError(
            f"{store.url}: {name} holds non-finite values in rows {list(map(int, rows))}; "
            "run featcache verify on it."
        )
    return values[:, prefix:]


def grid_of(store: FeatureStore) -> tuple[int, int]:
    rows, cols = store.attrs["encoder"]["layout"]["grid"]
    return int(rows), int(cols)


class ModelInputs:
    """The images of a store's rows as its encoder saw them (``(H, W, 3)`` floats in [0, 1]).

    The dataset is reloaded from ``dataset.source`` with its recorded mask-label convention
    and must hash to the recorded ``manifest_hash`` (else every image is "not shown", with
    why: the pixels could differ from those the model saw); a row's image is the record of
    the store's split with the row's id, read as extraction reads it (``Record.decode``).
    Its pixels are the store's recorded preprocessing (``encoder.preprocessing``, with the
    geometry record's resize mode and crop) applied to the decoded image, with the
    normalisation undone (``x * std + mean``).
    """

    def __init__(self, store: FeatureStore) -> None:
        from featcache.preprocess import Geometry, Preprocessing

        described = store.attrs["encoder"]
        pp = described["preprocessing"]
        geometry = Geometry.from_description(described)
        self.preprocessing = Preprocessing(
            image_size=tuple(pp["image_size"]),
            resize_mode=geometry.resize_mode,
            crop_pct=geometry.crop_pct,
            interpolation=pp["interpolation"],
            mean=tuple(pp["mean"]),
            std=tuple(pp["std"]),
        )
        self.size = tuple(int(v) for v in pp["image_size"])
        self.ids = store.read("ids")
        recorded = store.attrs["dataset"]
        source, split = recorded["source"], recorded["split"]
        self.records: dict[str, Any] = {}  # id -> featcache.datasets.Record
        self.problem: str | None = None
        try:
            from featcache.datasets import reopen_dataset

            dataset = reopen_dataset(recorded)
            self.records = {r.id: r for r in dataset.split(split)}
            same = dataset.manifest_hash(split) == recorded["manifest_hash"]
        except FeatcacheError as err:
            self.problem = f"dataset {source} unreadable: {err}"
            return
        if not same:
            self.problem = (
                f"dataset {source} (split {split}) is not the one the store was extracted from "
                "(manifest hash differs: changed, or read with other options)"
            )

    def image(self, row: int) -> tuple[np.ndarray | None, str | None]:
        """(``(H, W, 3)`` float32 in [0, 1], None), or (None, why the image is not shown)."""
        if self.problem:
            return None, self.problem
        image_id = str(self.ids[row])
        record = self.records.get(image_id)
        if record is None:
            return None, f"{image_id} is no longer in the dataset"
        try:
            tensor = self.preprocessing(record.decode())  # (3, H, W), as extraction reads it
        except FeatcacheError as err:
            return None, str(err)
        mean = np.asarray(self.preprocessing.mean, np.float32)[:, None, None]
        std = np.asarray(self.preprocessing.std, np.float32)[:, None, None]
        pixels = tensor.numpy() * std + mean
        return np.clip(pixels.transpose(1, 2, 0), 0.0, 1.0), None


# -- the figure -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GridLayout:
    """Where the panels go: ``rows`` x ``len(columns)`` panels of ``PANEL_PX`` square pixels,
    ``GAP_PX`` apart, below a ``TITLE_PX`` band of column titles and right of a ``LABEL_PX``
    band of row labels, with ``MARGIN_PX`` round the rest and, with a colour bar, a
    ``COLORBAR_PX`` band on the right. ``size_px`` is the PNG's (width, height)."""

    rows: int
    columns: tuple[str, ...]
    colorbar: bool = False

    @property
    def size_px(self) -> tuple[int, int]:
        cols = len(self.columns)
        right = COLORBAR_PX if self.colorbar else MARGIN_PX
        width = LABEL_PX + cols * PANEL_PX + (cols - 1) * GAP_PX + right
        height = TITLE_PX + self.rows * PANEL_PX + (self.rows - 1) * GAP_PX + MARGIN_PX
        return width, height

    def panel_box_px(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of panel (row, column) in PNG pixels."""
        left = LABEL_PX + column * (PANEL_PX + GAP_PX)
        top = TITLE_PX + row * (PANEL_PX + GAP_PX)
        return left, top, left + PANEL_PX, top + PANEL_PX


def panel_grid(layout: GridLayout):
    """(matplotlib ``Figure``, ``(rows, cols)`` array of panel axes, colour-bar axes labelled
    "colorbar", or None)."""
    from matplotlib.figure import Figure

    width, height = layout.size_px
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = np.empty((layout.rows, len(layout.columns)), dtype=object)
    for row in range(layout.rows):
        for column in range(len(layout.columns)):
            left, top, right, bottom = layout.panel_box_px(row, column)
            box = [left / width, 1 - bottom / height, PANEL_PX / width, PANEL_PX / height]
            ax = figure.add_axes(box)
            ax.set_axis_off()
            axes[row, column] = ax
    colorbar = None
    if layout.colorbar:
        left = layout.panel_box_px(0, len(layout.columns) - 1)[2] + 2 * GAP_PX
        top, bottom = TITLE_PX, height - MARGIN_PX
        colorbar = figure.add_axes(
            [left / width, MARGIN_PX / height, 12 / width, (bottom - top) / height],
            label="colorbar",
        )
    for column, title in enumerate(layout.columns):
        axes[0, column].set_title(title, fontsize=8, pad=4)
    return figure, axes, colorbar


def draw_image(ax, image: np.ndarray | None, note: str | None, size: Sequence[int]) -> None:
    """The model-input panel: the image, or a blank panel of ``size`` with ``note``."""
    if image is None:
        ax.imshow(np.ones((*size, 3), np.float32), interpolation="nearest")
        ax.text(
            0.5,
            0.5,
            _wrap(f"image not shown: {note}"),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=6,
        )
    else:
        ax.imshow(image, interpolation="nearest")


def _wrap(text: str, width: int = 34, lines: int = 6) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:lines])


def label_row(ax, text: str) -> None:
    ax.text(
        -0.04,
        0.5,
        text,
        transform=ax.transAxes,
        rotation=90,
        ha="right",
        va="center",
        fontsize=7,
    )


def row_label(row: int, ids: np.ndarray) -> str:
    name = str(ids[row]).rsplit("/", 1)[-1]
    return f"row {row}: {name if len(name) <= 24 else name[:21] + '...'}"


@dataclass
class FeatureFigure:
    """A rendered grid of panels and the data drawn in it.

    Attributes:
        figure: the matplotlib ``Figure`` (no pyplot state).
        layout: its ``GridLayout`` (rows x columns, pixel size).
        rows: the store rows shown, one figure row each.
        maps: column title -> ``(I, rows, cols, 3)`` RGB maps on the token grid (before
            upsampling), or ``(I, rows, cols)`` for a scalar map.
        images: per figure row, the model-input image or None.
        notes: per figure row, why its image is not shown (None when it is).
        extra: anything else a caller wants to keep (bases, arrays' names, ...).
    """

    figure: Any
    layout: GridLayout
    rows: np.ndarray
    maps: dict[str, np.ndarray]
    images: list[np.ndarray | None]
    notes: list[str | None]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def titled(
        cls,
        figure: Any,
        layout: GridLayout,
        title: str,
        rows: np.ndarray,
        maps: dict[str, np.ndarray],
        pictures: list[tuple[np.ndarray | None, str | None]],
        extra: dict[str, Any],
    ) -> FeatureFigure:
        """``figure`` with ``title`` above its panels, and its data; ``pictures``: per figure
        row, (model-input image or None, why it is not shown or None)."""
        figure.suptitle(title, fontsize=7, y=1 - 4 / layout.size_px[1], va="top")
        images, notes = [p[0] for p in pictures], [p[1] for p in pictures]
        return cls(figure, layout, rows, maps, images, notes, extra)

    def summary(self) -> str:
        """One line: the grid and its columns."""
        rows, columns = self.layout.rows, self.layout.columns
        return f"{rows} rows x {len(columns)} panels ({', '.join(columns)})"

    def save(self, path: str | Path) -> Path:
        """Write the figure (format from the suffix; PNG at ``DPI``), creating parent dirs."""
        path = check_image_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=DPI)
        return path


def check_image_path(path: str | Path) -> Path:
    """``path`` as a ``Path`` when matplotlib can write its suffix, else ``ShowError``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    supported = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in supported:
        raise ShowError(
            f"Expected --out to end in one of .{', .'.join(sorted(supported))}. Got {path} instead."
        )
    return path


def layer_title(name: str) -> str:
    return "final" if name == "final" else f"layer {name.split('/', 1)[1]}"


def show_store(
    url: str,
    *,
    layers: Sequence[str | int] | None = None,
    images: int | None = 8,
    rows: Sequence[int] | None = None,
    scale: str = "percentile",
    storage_options: dict | None = None,
) -> FeatureFigure:
    """PCA-to-RGB maps of a store's stored patch tokens (module doc), one row per image.

    ``layers``: stored layer numbers or "final" (default ``default_layers``); ``rows``: store
    rows to show (default: the first ``images`` valid rows of marked shards); ``scale``: how
    the three components map to [0, 1] (``SCALES``). Columns: the model-input image, then one
    PCA map per layer, each with its own basis fitted over the shown images.
    """
    if scale not in SCALES:
        raise ShowError(f"Expected --scale in {SCALES}. Got {scale!r} instead.")
    store = FeatureStore.open(url, storage_options=storage_options)
    require_tokens(store)
    names = [parse_layer(store, n) for n in layers] if layers else default_layers(store)
    names = list(dict.fromkeys(names))
    chosen = select_rows(shown_rows(store), images, rows, store.url)
    grid = grid_of(store)
    maps, bases = {}, {}
    for name in names:
        maps[layer_title(name)], bases[name] = pca_maps(
            patch_tokens(store, name, chosen), grid, scale
        )
    inputs = ModelInputs(store)
    pictures = [inputs.image(int(row)) for row in chosen]
    encoder = store.attrs["encoder"]["name"]
    layout = GridLayout(len(chosen), (f"{encoder} input", *maps))
    figure, axes, _ = panel_grid(layout)
    for index, row in enumerate(chosen.tolist()):
        image, note = pictures[index]
        draw_image(axes[index, 0], image, note, inputs.size)
        label_row(axes[index, 0], row_label(row, inputs.ids))
        for column, grid_maps in enumerate(maps.values(), start=1):
            axes[index, column].imshow(
                upsample_nearest(grid_maps[index], inputs.size), interpolation="nearest"
            )
    name = store.url.rstrip("/").rsplit("/", 1)[-1]
    title = (
        f"{name}: PCA of patch tokens -> RGB, fitted per column over these "
        f"{len(chosen)} images ({scale} scaled)"
    )
    extra = {"arrays": names, "bases": bases, "scale": scale}
    return FeatureFigure.titled(figure, layout, title, chosen, maps, pictures, extra)
