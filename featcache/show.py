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

The figure (``FeatureFigure``): one row per image, labelled with its row, class name and id
(the image's path relative to the dataset root: two ``04.jpg`` of different folders differ;
``row_label``); first panel the image as the model saw it, re-created from the store's
dataset record (``dataset.source`` reloaded, or ``data`` where the dataset has moved, the
row's id looked up) and the store's recorded preprocessing (input size, resize mode, crop,
interpolation; ``Preprocessing`` applied, then its normalisation undone), or a grey panel
with a note when that one image cannot be read; then one PCA map per chosen array, on the
token grid, upsampled nearest-neighbour to the image panel's size. When the dataset as a
whole cannot be read (moved: "dataset no longer at PATH"; changed: another manifest hash)
the maps, which need only the store, are still drawn, every input panel is grey without
text, and the figure title says why once (``FeatureFigure.dataset_note``, which the CLIs
print once). A ``data`` whose manifest hash is not the store's is refused (``ModelInputs``).
Panels are ``PANEL_PX`` pixels square at ``DPI``; ``panel_grid`` fixes every margin in
pixels, the title wrapped to the width, so the PNG's size follows from the grid and the
title's lines (``GridLayout.size_px``).
"""

from __future__ import annotations

import os
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
    "dataset_title",
    "row_label",
    "show_store",
]

SCALES = ("percentile", "minmax")
PERCENTILES = (1.0, 99.0)
DEFAULT_MAX_LAYERS = 4  # default columns: all stored layers up to this many, else spread out
PANEL_PX, GAP_PX, LABEL_PX, TITLE_PX, MARGIN_PX, COLORBAR_PX = 200, 8, 30, 44, 10, 110
TITLE_LINE_PX, TITLE_CHAR_PX = 12, 6  # per extra line of the figure title; per character
DPI = 100
ID_CHARS = 44  # characters of an image id that fit beside a panel in a row label


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
    """The images of a store's rows as its encoder saw them (``(H, W, 3)`` floats in [0, 1]),
    and the rows' captions (``caption``: row, class name, id).

    The dataset is reloaded from ``dataset.source`` (or from ``data``, where it has moved) with
    its recorded reader options and mask-label convention; a row's image is the record of the
    store's split with the row's id, read as extraction reads it (``Record.decode``). Its pixels
    are the store's recorded preprocessing (``encoder.preprocessing``, with the geometry
    record's resize mode and crop) applied to the decoded image, with the normalisation undone
    (``x * std + mean``).

    Ids are paths relative to the dataset root, so a moved dataset still serves every row once
    found. Which dataset is read, and what happens when it cannot be:
      - ``data`` given: it must read as a dataset whose split hashes to the recorded
        ``manifest_hash`` (the same images, ids and labels), else ``ShowError`` naming both
        hashes (or the reader's own error when it does not read at all).
      - ``data`` None: ``dataset.source`` is read. When it cannot be, or hashes differently,
        no image is shown and ``problem`` says why in one line, once for all rows: "dataset no
        longer at SOURCE" when nothing is at that local path any more (a pattern's folder
        gone, for shard and parquet patterns), else that it is unreadable or changed. The
        pictures of the features need only the store, so they are still drawn.
    """

    def __init__(self, store: FeatureStore, data: str | None = None) -> None:
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
        self.labels = np.asarray(store.read("labels"))
        recorded = store.attrs["dataset"]
        self.classes: list[str] = list(recorded.get("classes") or [])
        self.records: dict[str, Any] = {}  # id -> featcache.datasets.Record
        # why no row's image is shown (one line), or None; ``records`` filled when None
        self.problem: str | None = self._read(
            store.url, recorded, None if data is None else str(data)
        )

    def _read(self, url: str, recorded: dict, data: str | None) -> str | None:
        """Fill ``records`` from the dataset at ``data`` (None: ``dataset.source``); what is
        wrong with it, or None. ``data`` that does not read, or hashes differently, raises."""
        from featcache.datasets import reopen_dataset

        split, expected = recorded["split"], recorded["manifest_hash"]
        given = data is not None
        source = data if given else recorded["source"]
        try:
            dataset = reopen_dataset({**recorded, "source": source})
            found, records = dataset.manifest_hash(split), dataset.split(split)
        except FeatcacheError as err:
            if given:
                raise
            if _gone(source):
                return f"dataset no longer at {source}; give --data NEW_PATH where it moved"
            return f"dataset {source} unreadable: {err}"
        if found != expected:
            if given:
                raise ShowError(
                    f"Expected --data to hold the dataset {url} was extracted from (split "
                    f"{split}, manifest hash {expected}). Got {source}, manifest hash {found}, "
                    "instead."
                )
            return (
                f"dataset {source} (split {split}) is not the one the store was extracted from "
                f"(manifest hash {expected} recorded, {found} now: changed, or read with other "
                "options)"
            )
        self.records = {r.id: r for r in records}
        return None

    def caption(self, row: int, detail: str = "") -> str:
        """``row_label`` of store row ``row``: its class name (from the store) and id."""
        label = int(self.labels[row])
        known = 0 <= label < len(self.classes)
        name = self.classes[label] if known else ("unlabelled" if label < 0 else str(label))
        return row_label(row, str(self.ids[row]), name, detail)

    def image(self, row: int) -> tuple[np.ndarray | None, str | None]:
        """(``(H, W, 3)`` float32 in [0, 1], None), or (None, why this row's image is not
        shown), or (None, None) when no image is shown at all (``problem`` says why)."""
        if self.problem:
            return None, None
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


def _gone(source: str) -> bool:
    """True when ``source`` is a local path with nothing there: the path itself, or for a
    pattern (``*``, ``?``, ``[``, ``{``) the folder holding it. Remote sources are never gone
    (their errors are shown as they are)."""
    if "://" in source:
        return False
    if any(c in source for c in "*?[{"):
        return not os.path.isdir(os.path.dirname(os.path.abspath(source)))
    return not os.path.exists(source)


# -- the figure -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GridLayout:
    """Where the panels go: ``rows`` x ``len(columns)`` panels of ``PANEL_PX`` square pixels,
    ``GAP_PX`` apart, below a band for the figure title and the column titles (``TITLE_PX``
    for a one-line title, ``TITLE_LINE_PX`` more per further line: ``top_px``) and right of a
    ``LABEL_PX`` band of row labels, with ``MARGIN_PX`` round the rest and, with a colour bar,
    a ``COLORBAR_PX`` band on the right. ``size_px`` is the PNG's (width, height). ``title``
    is wrapped to the width (``title_lines``; a newline starts a new line)."""

    rows: int
    columns: tuple[str, ...]
    colorbar: bool = False
    title: str = ""

    @property
    def width_px(self) -> int:
        cols = len(self.columns)
        right = COLORBAR_PX if self.colorbar else MARGIN_PX
        return LABEL_PX + cols * PANEL_PX + (cols - 1) * GAP_PX + right

    @property
    def title_lines(self) -> list[str]:
        """``title`` in lines of at most (width - 2 margins) / ``TITLE_CHAR_PX`` characters."""
        import textwrap

        chars = (self.width_px - 2 * MARGIN_PX) // TITLE_CHAR_PX
        return [line for part in self.title.split("\n") for line in textwrap.wrap(part, chars)]

    @property
    def top_px(self) -> int:
        return TITLE_PX + max(0, len(self.title_lines) - 1) * TITLE_LINE_PX

    @property
    def size_px(self) -> tuple[int, int]:
        height = self.top_px + self.rows * PANEL_PX + (self.rows - 1) * GAP_PX + MARGIN_PX
        return self.width_px, height

    def panel_box_px(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of panel (row, column) in PNG pixels."""
        left = LABEL_PX + column * (PANEL_PX + GAP_PX)
        top = self.top_px + row * (PANEL_PX + GAP_PX)
        return left, top, left + PANEL_PX, top + PANEL_PX


def panel_grid(layout: GridLayout):
    """(matplotlib ``Figure`` titled with ``layout.title_lines``, ``(rows, cols)`` array of
    panel axes, colour-bar axes labelled "colorbar", or None)."""
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
        top, bottom = layout.top_px, height - MARGIN_PX
        colorbar = figure.add_axes(
            [left / width, MARGIN_PX / height, 12 / width, (bottom - top) / height],
            label="colorbar",
        )
    for column, title in enumerate(layout.columns):
        axes[0, column].set_title(title, fontsize=8, pad=4)
    if layout.title:
        lines = "\n".join(layout.title_lines)
        figure.suptitle(lines, fontsize=7, y=1 - 4 / height, va="top")
    return figure, axes, colorbar


def draw_image(ax, image: np.ndarray | None, note: str | None, size: Sequence[int]) -> None:
    """The model-input panel: the image, or a light grey panel of ``size`` with ``note`` (none
    when no image is shown at all: the figure's title says why, once)."""
    if image is None:
        ax.imshow(np.full((*size, 3), 0.9, np.float32), interpolation="nearest")
    if image is None and note:
        ax.text(
            0.5,
            0.5,
            _wrap(f"image not shown: {note}"),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=6,
        )
    if image is not None:
        ax.imshow(image, interpolation="nearest")


def _wrap(text: str, width: int = 34, lines: int = 6) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:lines])


def label_row(ax, text: str) -> None:
    """``text`` (``row_label``'s two lines) upright along the left edge of panel ``ax``."""
    ax.text(
        -0.04,
        0.5,
        text,
        transform=ax.transAxes,
        rotation=90,
        ha="right",
        va="center",
        fontsize=6,
        linespacing=1.1,
    )


def row_label(row: int, image_id: str, class_name: str, detail: str = "") -> str:
    """A figure row's label, two lines: "row R, class C[, detail]", then the image's id (its
    path relative to the dataset root, so two ``04.jpg`` of different folders differ); an id
    longer than ``ID_CHARS`` keeps its end (the file name) after "..."."""
    first = f"row {row}, class {class_name}" + (f", {detail}" if detail else "")
    if len(image_id) > ID_CHARS:
        image_id = "..." + image_id[-(ID_CHARS - 3) :]
    return f"{first}\n{image_id}"


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
        notes: per figure row, why that row's image is not shown (None when it is, or when
            no image is shown at all).
        extra: anything else a caller wants to keep (bases, arrays' names, ...).
        dataset_note: why no image is shown at all (``ModelInputs.problem``: the dataset
            moved or changed), said once, in the figure title (``dataset_title``); None
            when the dataset was read.
    """

    figure: Any
    layout: GridLayout
    rows: np.ndarray
    maps: dict[str, np.ndarray]
    images: list[np.ndarray | None]
    notes: list[str | None]
    extra: dict[str, Any] = field(default_factory=dict)
    dataset_note: str | None = None

    @classmethod
    def drawn(
        cls,
        figure: Any,
        layout: GridLayout,
        rows: np.ndarray,
        maps: dict[str, np.ndarray],
        pictures: list[tuple[np.ndarray | None, str | None]],
        extra: dict[str, Any],
        dataset_note: str | None = None,
    ) -> FeatureFigure:
        """The figure and its data; ``pictures``: per figure row, (model-input image or None,
        why it is not shown or None)."""
        images, notes = [p[0] for p in pictures], [p[1] for p in pictures]
        return cls(figure, layout, rows, maps, images, notes, extra, dataset_note)

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


def dataset_title(title: str, dataset_note: str | None) -> str:
    """A figure title, and on its own line "input images not shown: ``dataset_note``"."""
    return f"{title}\ninput images not shown: {dataset_note}" if dataset_note else title


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
    data: str | None = None,
) -> FeatureFigure:
    """PCA-to-RGB maps of a store's stored patch tokens (module doc), one row per image.

    ``layers``: stored layer numbers or "final" (default ``default_layers``); ``rows``: store
    rows to show (default: the first ``images`` valid rows of marked shards); ``scale``: how
    the three components map to [0, 1] (``SCALES``); ``data``: where the store's dataset is
    now, when it has moved (``ModelInputs``: checked against the recorded manifest hash).
    Columns: the model-input image, then one PCA map per layer, each with its own basis fitted
    over the shown images.
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
    inputs = ModelInputs(store, data)
    pictures = [inputs.image(int(row)) for row in chosen]
    encoder = store.attrs["encoder"]["name"]
    name = store.url.rstrip("/").rsplit("/", 1)[-1]
    title = (
        f"{name}: PCA of patch tokens -> RGB, fitted per column over these "
        f"{len(chosen)} images ({scale} scaled)"
    )
    title = dataset_title(title, inputs.problem)
    layout = GridLayout(len(chosen), (f"{encoder} input", *maps), title=title)
    figure, axes, _ = panel_grid(layout)
    for index, row in enumerate(chosen.tolist()):
        image, note = pictures[index]
        draw_image(axes[index, 0], image, note, inputs.size)
        label_row(axes[index, 0], inputs.caption(row))
        for column, grid_maps in enumerate(maps.values(), start=1):
            axes[index, column].imshow(
                upsample_nearest(grid_maps[index], inputs.size), interpolation="nearest"
            )
    extra = {"arrays": names, "bases": bases, "scale": scale}
    return FeatureFigure.drawn(figure, layout, chosen, maps, pictures, extra, inputs.problem)
