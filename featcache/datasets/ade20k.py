"""ADE20K (SceneParsing, ADEChallengeData2016): its 150 class names and folder layout.

``ADE20K_CLASSES[k]`` is the class of training label ``k``, which is raw annotation value
``k + 1`` (value 0 is "other objects", ignored under ``reduce_zero_label``). The order is
objectInfo150.txt's, as mmsegmentation's ``ADE20KDataset.METAINFO["classes"]`` lists it
(mmsegmentation spells class 7 "bed " with a trailing space; here it is "bed").

Rules (tested in tests/test_ade20k.py):
  - The ADE20K layout (ADEChallengeData2016): a folder whose subfolders include ``images`` and
    ``annotations``, with ``training`` and/or ``validation`` under either. Splits "train"
    (training) and "val" (validation); every image (``IMAGE_EXTENSIONS``, any case, found
    recursively) has the ``.png`` annotation of the same relative path and stem, and every
    ``.png`` annotation its image, else a ``ManifestError`` names the file. Labels are -1 and
    the classes are ``ADE20K_CLASSES``. Everything else (objectInfo150.txt,
    sceneCategories.txt, other folders, also beside training / validation) is ignored.
  - ``reduce_zero_label`` is on by default (``MaskLabels`` in featcache/datasets/core.py).
"""

from __future__ import annotations

import os
import posixpath

from featcache.datasets.core import (
    IMAGE_EXTENSIONS,
    DataOptions,
    Dataset,
    ManifestError,
    MaskLabels,
    Reader,
    Record,
    Resolve,
    absolute_path,
    images_under,
    resolver,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_IGNORE_VALUE",
    "ADE20K_OTHER",
    "ADE20K_SPLITS",
    "READER",
    "detect",
    "load",
]

# folder under images/ and annotations/ -> split name
ADE20K_SPLITS = {"training": "train", "validation": "val"}
ADE20K_IGNORE_VALUE = 255  # never in ADE20K's own annotations; mmsegmentation's ignore_index
ADE20K_OTHER = "other"  # class 0's name when reduce_zero_label is off

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


def detect(root: str, top: list[str]) -> bool:
    """``images/`` and ``annotations/`` with a training or validation folder under either."""
    return {"images", "annotations"} <= set(top) and any(
        os.path.isdir(os.path.join(root, kind, folder))
        for kind in ("images", "annotations")
        for folder in ADE20K_SPLITS
    )


def _by_stem(root: str, folder: str, resolve: Resolve, suffixes: tuple[str, ...]) -> dict:
    """Files under ``root/folder`` ending in ``suffixes``: path below it without extension ->
    id; two files of one stem are a ``ManifestError`` naming both."""
    found: dict[str, str] = {}
    for rid in sorted(images_under(root, folder, resolve)):
        if not rid.lower().endswith(suffixes):
            continue
        stem = posixpath.splitext(rid[len(folder) + 1 :])[0]
        if stem in found:
            raise ManifestError(
                f"Expected one file per name in {folder} of the ADE20K layout under {root}. "
                f"Got {found[stem]!r} and {rid!r} instead."
            )
        found[stem] = rid
    return found


def load(root: str, options: DataOptions, reduce_zero_label: bool | None = None) -> Dataset:
    """Read the ADE20K layout under ``root`` (rules in the module doc); ``reduce_zero_label``
    None is on."""
    options.check("the ADE20K layout", (), root)
    reduce_zero_label = True if reduce_zero_label is None else reduce_zero_label
    resolve = resolver(root)
    records, problems = [], []
    for folder, split in ADE20K_SPLITS.items():
        images = _by_stem(root, f"images/{folder}", resolve, IMAGE_EXTENSIONS)
        annotations = _by_stem(root, f"annotations/{folder}", resolve, (".png",))
        for stem in sorted(images.keys() | annotations.keys()):
            image, annotation = images.get(stem), annotations.get(stem)
            if annotation is None:
                problems.append(f"the image {image} without annotations/{folder}/{stem}.png")
            elif image is None:
                problems.append(
                    f"the annotation {annotation} with no image images/{folder}/{stem}.*"
                )
            else:
                records.append(
                    Record(
                        image,
                        absolute_path(root, image),
                        -1,
                        split,
                        absolute_path(root, annotation),
                    )
                )
    if problems:
        more = f" (and {len(problems) - 1} more unpaired files)" if len(problems) > 1 else ""
        raise ManifestError(
            f"Expected each image under images/ of the ADE20K layout under {root} to have its "
            f".png annotation of the same name under annotations/, and each annotation its "
            f"image. Got {problems[0]}{more} instead."
        )
    if not records:
        folders = " or ".join(f"images/{folder}" for folder in ADE20K_SPLITS)
        raise ManifestError(
            f"Expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {folders} of the ADE20K "
            f"layout under {root}. Got none instead."
        )
    classes = ADE20K_CLASSES if reduce_zero_label else (ADE20K_OTHER, *ADE20K_CLASSES)
    mask_labels = MaskLabels(reduce_zero_label, ADE20K_IGNORE_VALUE, len(classes))
    records = tuple(sorted(records, key=lambda r: r.id))
    return Dataset(root, root, classes, records, mask_labels, format="ade20k")


READER = Reader("ade20k", "folder", detect, load, mask_labels=True)
