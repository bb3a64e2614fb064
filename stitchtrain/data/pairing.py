"""Which stores a stitch run reads, and whether they pair.

Two stores pair when they hold the same images in the same rows (``check_same_images``, the one
rule every command that reads two stores row by row applies: fit and its dry run, eval, the
test stores of a fit or transfer, predictions, cka, show, sweep, tree build): same dataset
manifest hash, split, order seed and number of images, the same ``ids`` in every row both have
written (marked shards; the hash is compared, so a store written by another tool version or
from a reordered manifest is caught), and the same content: every row valid in both has the
same row digest (blake2b of the bytes decoded, ``check_digests``), so stores of different
pixels under the same names never pair. Format-2 stores have no digests, and rows written from
arrays have the all-zero digest (content not known): those rows are paired by id only, with a
logged warning. For a stitch, each objective then needs arrays:

  lfm       source layers/n (lora: layers/n-1)  target layers/n
  ffm       source layers/n (lora: layers/n-1)  target final (or pooled with pooled-only)
  tlt       source layers/n (lora: layers/n-1)  target labels (cls) / masks (seg)

Stitching is per token, so paired stores must also agree on geometry: token (i, j) of the
source (its grid mapped onto the target's by grid fraction, as the stitch resamples) must see
the same pixels of the original image as token (i, j) of the target. ``check_geometry``
compares the geometries the stores record (``featcache.preprocess.Geometry``) over 1:1, 4:3,
3:4 and 16:9 images and refuses an offset over ``GEOMETRY_TOLERANCE`` target patches, unless
told to allow it (CLI: ``--allow-geometry-mismatch``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import PurePosixPath

import numpy as np

from featcache.datasets.core import TEST_SPLIT_WAYS
from featcache.errors import FeatcacheError
from featcache.preprocess import REFERENCE_SIZES, Geometry, token_offset
from featcache.store import FeatureStore, find_stores
from stitchtrain.data.names import encoder_label
from stitchtrain.data.positions import (
    check_position,
    needed_arrays,
    positions_with_arrays,
    source_array,
)

__all__ = [
    "PairingError",
    "ids_hash",
    "check_digests",
    "check_same_images",
    "marked_rows",
    "check_pair",
    "check_geometry",
    "store_geometry",
    "GEOMETRY_TOLERANCE",
    "source_array",
    "find_split_store",
    "stored_arrays",
    "usable_positions",
]


class PairingError(FeatcacheError, ValueError):
    """Stores that do not hold the same images in the same order, or lack a needed array."""


_log = logging.getLogger(__name__)


def ids_hash(store: FeatureStore, rows: np.ndarray | None = None) -> str:
    """SHA-256 (first 16 hex) of the store's ``ids`` in row order (only ``rows`` if given)."""
    ids = np.asarray(store.read("ids"), dtype=object)
    ids = ids if rows is None else ids[rows]
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def check_digests(source: FeatureStore, target: FeatureStore, rows: np.ndarray) -> None:
    """Refuse two stores whose ``rows`` (written in both) hold different images: a row valid
    in both whose row digests differ raises ``PairingError`` naming its id and both stores.

    Rows without a digest in either store (a format-2 store; the all-zero digest of rows
    written from arrays) are compared by id only (``check_pair``'s ids hash), with a warning.
    """
    lacking = [store.url for store in (source, target) if "digests" not in store.array_names()]
    if lacking:
        _log.warning(
            f"{', '.join(lacking)}: format 2 (no row digests): pairing compares ids only, not "
            "image content; extract it again for content identity."
        )
        return
    digests = [store.read("digests")[rows] for store in (source, target)]
    valid = (
        np.asarray(source.read("valid"), bool)[rows] & np.asarray(target.read("valid"), bool)[rows]
    )
    known = valid & digests[0].any(axis=1) & digests[1].any(axis=1)
    differ = np.flatnonzero(known & (digests[0] != digests[1]).any(axis=1))
    if len(differ):
        row = int(rows[differ[0]])
        image = source.read("ids", slice(row, row + 1))[0]
        raise PairingError(
            f"Expected {source.url} and {target.url} to hold the same images. Got "
            f"different content for {image} (row {row}; {len(differ)} rows differ) instead: "
            "extract both from the same files."
        )
    unknown = int((valid & ~known).sum())
    if unknown:
        _log.warning(
            f"{source.url} / {target.url}: {unknown} valid rows carry no row digest (written "
            "from arrays, not images): those are paired by id only."
        )


def check_same_images(first: FeatureStore, second: FeatureStore) -> None:
    """Raise ``PairingError`` unless two stores hold the same images in the same rows (module
    docstring): the same dataset manifest hash, split, order seed and number of images, the
    same ids in the rows both have written, and the same row digest in every row valid in both
    (``check_digests``). Every command that pairs two stores row by row calls this."""
    first_data, second_data = first.attrs["dataset"], second.attrs["dataset"]
    for key in ("manifest_hash", "split", "order_seed", "num_images"):
        if first_data.get(key) != second_data.get(key):
            raise PairingError(
                f"Expected {first.url} and {second.url} to hold the same images. Got different "
                f"images (dataset {key} {first_data.get(key)!r} vs {second_data.get(key)!r}) "
                "instead: extract both from the same --data and --split."
            )
    written = marked_rows(first, second)  # unmarked shards hold no ids yet
    if ids_hash(first, written) != ids_hash(second, written):
        raise PairingError(
            f"Expected {first.url} and {second.url} to hold the same images in the same rows. "
            "Got another order (ids hash differs) instead: extract both with the same featcache "
            "version and order seed."
        )
    check_digests(first, second, written)


GEOMETRY_TOLERANCE = 0.1  # target patches: paired token centres may differ by this much
_GEOMETRY_FIX = (
    "Extract both with the same geometry (featcache extract --crop-pct F --resize-mode "
    "shortest|squash applies one to every --model of a run; the presets share one by default), "
    "or pass --allow-geometry-mismatch to pair them anyway."
)


def store_geometry(store: FeatureStore) -> Geometry:
    """The geometry a store records (derived from its preprocessing for older stores)."""
    try:
        return Geometry.from_description(store.attrs["encoder"])
    except (KeyError, TypeError, ValueError) as err:
        raise PairingError(
            f"The store {store.url} records no usable geometry ({type(err).__name__}: {err}); "
            "extract it again with this featcache version."
        ) from err


def check_geometry(
    source: FeatureStore, target: FeatureStore, *, allow_mismatch: bool = False
) -> float:
    """Largest offset, in target patches, between paired token centres of two stores.

    Raises ``PairingError`` naming both geometries and the override when it exceeds
    ``GEOMETRY_TOLERANCE`` and ``allow_mismatch`` is False.
    """
    a, b = store_geometry(source), store_geometry(target)
    offset = token_offset(a, b, REFERENCE_SIZES)
    if offset > GEOMETRY_TOLERANCE and not allow_mismatch:
        name_a = source.attrs["encoder"].get("name", "?")
        name_b = target.attrs["encoder"].get("name", "?")
        raise PairingError(
            f"Source {name_a} ({a}; {source.url}) and target {name_b} ({b}; {target.url}) see "
            f"different pixels: paired token centres differ by up to {offset:.2f} target "
            f"patches (tolerance {GEOMETRY_TOLERANCE}). {_GEOMETRY_FIX}"
        )
    return offset


def marked_rows(*stores: FeatureStore) -> np.ndarray:
    """Rows (ascending) inside a marked shard of every store: the rows both stores wrote."""
    return np.flatnonzero(np.logical_and.reduce([store.marked_mask() for store in stores]))


def stored_arrays(store: FeatureStore) -> set[str]:
    """The feature arrays a store holds: ``layers/<n>`` of its layers, ``final``, ``pooled``."""
    layers = {f"layers/{n}" for n in store.layers}
    return layers | {a for a in ("final", "pooled") if a in store.group}


def usable_positions(
    source: FeatureStore,
    target: FeatureStore,
    *,
    stitch: str,
    objective: str,
    pooled_only: bool = False,
) -> list[int]:
    """The stitch positions valid for the stores' encoders at which both stores hold what a
    ``stitch`` trained by ``objective`` reads (``stitchtrain.data.positions``), from the
    target's own layers on when it is a hybrid (``own_layers_from``)."""
    positions = positions_with_arrays(
        source.attrs["encoder"]["depth"],
        target.attrs["encoder"]["depth"],
        {"source": stored_arrays(source), "target": stored_arrays(target)},
        stitch=stitch,
        objective=objective,
        pooled_only=pooled_only,
    )
    return [n for n in positions if n >= _own_layers_from(target)]


def _own_layers_from(store: FeatureStore) -> int:
    """The first layer of a hybrid's own token shape (its source's layers before it have
    another); 0 for any other encoder."""
    return int((store.attrs["encoder"].get("hybrid") or {}).get("own_layers_from", 0))


def _require(store: FeatureStore, array: str, role: str, why: str, usable: str) -> None:
    if array not in store.group:
        have = sorted(stored_arrays(store))
        raise PairingError(
            f"The {role} store {store.url} has no {array!r}, which {why} needs. It holds: "
            f"{', '.join(have)} ({usable}). Extract it with --layers including that layer (and "
            "--tokens all), or stitch at a position these stores allow."
        )


def check_pair(
    source: FeatureStore,
    target: FeatureStore,
    *,
    position: int,
    stitch: str,
    objective: str,
    task: str,
    pooled_only: bool = False,
    allow_geometry_mismatch: bool = False,
) -> None:
    """Raise ``PairingError`` naming the mismatch or the missing array (``PositionError`` for
    a position outside ``stitchtrain.data.positions.valid_positions``); return when usable.

    ``allow_geometry_mismatch`` pairs stores whose tokens see different pixels
    (``check_geometry``)."""
    check_same_images(source, target)
    check_geometry(source, target, allow_mismatch=allow_geometry_mismatch)
    source_encoder, target_encoder = source.attrs["encoder"], target.attrs["encoder"]
    check_position(
        position,
        source_encoder["depth"],
        target_encoder["depth"],
        source_encoder["name"],
        target_encoder["name"],
    )
    options = {"stitch": stitch, "objective": objective, "pooled_only": pooled_only}
    allowed = ", ".join(map(str, usable_positions(source, target, **options))) or "none"
    usable = f"for {objective} with a {stitch} stitch, these stores allow: {allowed}"
    own = _own_layers_from(target)
    if position < own:
        raise PairingError(
            f"Expected --position of at least {own} into the hybrid "
            f"{encoder_label(target_encoder)}: its layers before that are its source's, of "
            f"another token shape. Got {position} instead ({usable})."
        )
    for role, array, why in needed_arrays(position, stitch, objective, pooled_only=pooled_only):
        _require(source if role == "source" else target, array, role, why, usable)
    stages = objective.split("+")
    if "tlt" in stages and task == "seg" and "masks" not in target.group:
        raise PairingError(f"The target store {target.url} has no masks; --task seg needs them.")


def find_split_store(train_store: FeatureStore, split: str, needed: list[str]) -> FeatureStore:
    """The store of another split written like ``train_store`` (same encoder fingerprint, same
    dataset source, same layers and settings), found under the root two levels up
    (``ROOT/<split>/<store>.zarr``, featcache's layout). A store of the split held out with
    another ``--test-fraction`` / ``--subset-seed`` (or held out where the train store was not)
    would share images with the train rows: it is refused, naming both. None found: the error
    names the ways to get a test split."""
    root = str(PurePosixPath(train_store.url).parent.parent)
    encoder = train_store.attrs["encoder"]["fingerprint"]
    source = train_store.attrs["dataset"]["source"]
    held_out = _held_out(train_store.attrs["dataset"])
    other_cut: list[FeatureStore] = []
    for candidate in find_stores(root, storage_options=train_store.storage_options):
        attrs = candidate.attrs
        if (
            attrs["encoder"]["fingerprint"] == encoder
            and attrs["dataset"]["source"] == source
            and attrs["dataset"]["split"] == split
            and all(name in candidate.group for name in needed)
            and candidate.is_complete
        ):
            if _held_out(attrs["dataset"]) == held_out:
                return candidate
            other_cut.append(candidate)
    if other_cut:
        found = other_cut[0]
        raise PairingError(
            f"Expected a {split!r} store cut from the data like the train store "
            f"{train_store.url} ({_cut(held_out)}). Got {found.url} "
            f"({_cut(_held_out(found.attrs['dataset']))}) instead, which would share images "
            "with the train rows: extract both splits with the same --test-fraction and "
            "--subset-seed, or name the store explicitly (--source-test / --target-test)."
        )
    raise PairingError(
        f"No complete {split!r} store for {train_store.attrs['encoder']['name']} (fingerprint "
        f"{encoder}) with {', '.join(needed)} under {root}. Extract that split, or name the "
        "store explicitly (--source-test / --target-test)."
        + (f" For a test split: {TEST_SPLIT_WAYS}." if split == "test" else "")
    )


def _held_out(dataset: dict) -> tuple[float, int] | None:
    """A store's held-out test split (``--test-fraction``, seed) from its ``dataset``
    attribute's options; None when it was extracted without one."""
    options = dataset.get("options") or {}
    if options.get("test_fraction") is None:
        return None
    return options["test_fraction"], options.get("subset_seed", 0)


def _cut(held_out: tuple[float, int] | None) -> str:
    if held_out is None:
        return "no --test-fraction"
    return f"--test-fraction {held_out[0]:g} --subset-seed {held_out[1]}"
