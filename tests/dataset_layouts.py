"""Tiny datasets written in the layouts the real ones ship in (none can be downloaded here).

Each ``make_*`` writes small seeded JPEGs plus the dataset's own annotation files, following
the published layout, and returns the root and what it wrote (ids, labels, boxes) so tests can
check the readers against the generator rather than against themselves.

  - fMoW-RGB: ``<split>/<category>/<category>_<loc>/<category>_<loc>_<n>_rgb.{jpg,json}``,
    the JSON carrying ``bounding_boxes`` [{"box": [x, y, w, h], "category", "ID"}] among
    fMoW's other metadata keys (gsd, img_width, img_height, timestamp, ...).
  - iNaturalist 2021: ``train.json`` / ``val.json`` (COCO style: images with id and
    file_name, annotations with image_id and category_id, categories with the taxonomy
    fields) and images under ``train/<image_dir_name>/<uuid>.jpg``.
  - FGVC-Aircraft: ``fgvc-aircraft-2013b/data/images/<id>.jpg``, the
    ``images_<level>_<split>.txt`` lists, ``variants.txt`` / ``families.txt`` /
    ``manufacturers.txt`` and ``images_box.txt`` (1-based inclusive boxes).
  - Corpora: one set of JPEGs (``corpus_images``) written as a class folder, a LLaVA-1.5 JSON,
    webdataset tar shards (img2dataset's members: jpg, txt, json, cls) and Hugging Face
    parquet (image {bytes, path}, ClassLabel label, features in the schema metadata), so each
    format's extraction can be compared with the folder's.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


# ---- fMoW-RGB -------------------------------------------------------------------------------

FMOW_CATEGORIES = ("airport", "crop_field", "port")


def make_fmow(
    root: str | Path,
    *,
    per_split: dict[str, dict[str, int]] | None = None,
    views: int = 2,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> tuple[Path, dict[str, tuple[str, str, tuple[int, int, int, int]]]]:
    """Write fMoW-RGB with ``per_split[split][category]`` locations of ``views`` images each.

    Returns (root, {id: (category, split, (x, y, w, h))}). Also writes the test/ and seq/
    folders fMoW has, whose images sit in numbered folders without categories.
    """
    root = Path(root)
    per_split = per_split or {"train": dict.fromkeys(FMOW_CATEGORIES, 2), "val": {"port": 1}}
    rng = np.random.default_rng(seed)
    written = {}
    for split, counts in per_split.items():
        for category, locations in counts.items():
            for loc in range(locations):
                folder = root / split / category / f"{category}_{loc}"
                for view in range(views):
                    stem = f"{category}_{loc}_{view}_rgb"
                    _jpeg(folder / f"{stem}.jpg", rng, size)
                    w, h = int(rng.integers(4, size[0] // 2)), int(rng.integers(4, size[1] // 2))
                    x, y = int(rng.integers(0, size[0] - w)), int(rng.integers(0, size[1] - h))
                    meta = {
                        "bounding_boxes": [
                            {"box": [x, y, w, h], "category": category, "ID": 1000 + loc}
                        ],
                        "gsd": 0.5,
                        "img_width": size[0],
                        "img_height": size[1],
                        "timestamp": "2015-04-01T10:00:00Z",
                        "utm": "15R",
                    }
                    (folder / f"{stem}.json").write_text(json.dumps(meta))
                    written[f"{split}/{category}/{category}_{loc}/{stem}.jpg"] = (
                        category,
                        split,
                        (x, y, w, h),
                    )
    for extra in ("test/0000000/0000000_0_rgb.jpg", "seq/0000001/0000001_0_rgb.jpg"):
        _jpeg(root / extra, rng, size)
    return root, written


# ---- iNaturalist 2021 -----------------------------------------------------------------------

# (name, kingdom, phylum, class, order, family, genus)
INAT_SPECIES = (
    ("Hyles lineata", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Sphingidae", "Hyles"),
    ("Manduca sexta", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Sphingidae", "Manduca"),
    ("Pieris rapae", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Pieridae", "Pieris"),
    ("Pyrausta aurata", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Pyralidae",
     "Pyrausta"),
    ("Vanessa cardui", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae",
     "Vanessa"),
    ("Apis mellifera", "Animalia", "Arthropoda", "Insecta", "Hymenoptera", "Apidae", "Apis"),
)  # fmt: skip


def inat_categories() -> list[dict]:
    """The categories entries of an iNat 2021 JSON for ``INAT_SPECIES`` (ids 0..5)."""
    fields = ("kingdom", "phylum", "class", "order", "family", "genus")
    categories = []
    for cid, (name, *taxonomy) in enumerate(INAT_SPECIES):
        entry = {"id": cid, "name": name, "common_name": name.split()[0]}
        entry.update(zip(fields, taxonomy, strict=True))
        entry["supercategory"] = "Insects"
        entry["specific_epithet"] = name.split()[1]
        entry["image_dir_name"] = f"{cid:05d}_" + "_".join([*taxonomy, name.split()[1]])
        categories.append(entry)
    return categories


def make_inat2021(
    root: str | Path,
    *,
    per_split: dict[str, int] | None = None,
    size: tuple[int, int] = (32, 24),
    seed: int = 0,
) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Write iNat 2021 with ``per_split[split]`` images of every species.

    Returns (root, {file_name: (species name, split)}).
    """
    root = Path(root)
    per_split = per_split or {"train": 4, "val": 1}
    rng = np.random.default_rng(seed)
    namespace = uuid.UUID(int=seed)
    categories = inat_categories()
    written, next_id = {}, 0
    for split, count in per_split.items():
        images, annotations = [], []
        for category in categories:
            for i in range(count):
                key = f"{split}/{category['id']}/{i}"
                file_name = f"{split}/{category['image_dir_name']}/{uuid.uuid5(namespace, key)}.jpg"
                _jpeg(root / file_name, rng, size)
                images.append(
                    {
                        "id": next_id,
                        "width": size[0],
                        "height": size[1],
                        "file_name": file_name,
                        "license": 0,
                        "rights_holder": "someone",
                        "date": "2019-06-01 10:00:00+00:00",
                        "latitude": 40.0,
                        "longitude": -100.0,
                        "location_uncertainty": 10,
                    }
                )
                annotations.append(
                    {"id": next_id, "image_id": next_id, "category_id": category["id"]}
                )
                written[file_name] = (category["name"], split)
                next_id += 1
        content = {
            "info": {"year": 2021, "version": "2021", "description": "generated"},
            "images": images,
            "categories": categories,
            "annotations": annotations,
            "licenses": [{"id": 0, "name": "CC BY 4.0", "url": ""}],
        }
        (root / f"{split}.json").write_text(json.dumps(content))
    return root, written


# ---- FGVC-Aircraft --------------------------------------------------------------------------

# (variant, family, manufacturer)
AIRCRAFT = (
    ("707-320", "Boeing 707", "Boeing"),
    ("737-200", "Boeing 737", "Boeing"),
    ("737-300", "Boeing 737", "Boeing"),
    ("A300B4", "A300", "Airbus"),
    ("Cessna 172", "Cessna 172", "Cessna"),
)


def make_aircraft(
    root: str | Path,
    *,
    per_split: dict[str, int] | None = None,
    size: tuple[int, int] = (48, 36),
    seed: int = 0,
) -> tuple[Path, dict[str, tuple[tuple[str, str, str], str, tuple[int, int, int, int]]]]:
    """Write ``fgvc-aircraft-2013b`` under ``root`` with ``per_split[split]`` images of every
    variant. Returns (the 2013b folder, {image id: ((variant, family, manufacturer), split,
    1-based (xmin, ymin, xmax, ymax))})."""
    base = Path(root) / "fgvc-aircraft-2013b"
    data = base / "data"
    per_split = per_split or {"train": 2, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    written, number = {}, 1000000
    for split, count in per_split.items():
        for names in AIRCRAFT:
            for _ in range(count):
                image_id = f"{number:07d}"
                number += 13
                _jpeg(data / "images" / f"{image_id}.jpg", rng, size)
                xmin, ymin = int(rng.integers(1, 10)), int(rng.integers(1, 10))
                xmax, ymax = (
                    int(rng.integers(xmin + 5, size[0])),
                    int(rng.integers(ymin + 5, size[1])),
                )
                written[image_id] = (names, split, (xmin, ymin, xmax, ymax))
    for level, column, listing in (
        ("variant", 0, "variants"),
        ("family", 1, "families"),
        ("manufacturer", 2, "manufacturers"),
    ):
        for split in (*per_split, "trainval"):
            chosen = ("train", "val") if split == "trainval" else (split,)
            lines = [
                f"{i} {names[column]}\n" for i, (names, s, _) in written.items() if s in chosen
            ]
            (data / f"images_{level}_{split}.txt").write_text("".join(lines))
        # the published lists are in their own (not sorted) order
        ordered = list(dict.fromkeys(names[column] for names in reversed(AIRCRAFT)))
        (data / f"{listing}.txt").write_text("".join(f"{name}\n" for name in ordered))
    (data / "images_box.txt").write_text(
        "".join(f"{i} {' '.join(map(str, box))}\n" for i, (_, _, box) in written.items())
    )
    (base / "README.html").write_text("<html>FGVC-Aircraft</html>")
    return base, written


# ---- corpus formats: the same images as a class folder, a LLaVA JSON, tars, parquet ---------

CORPUS_CLASSES = ("cat", "dog", "eel")


def corpus_images(count: int = 7, *, seed: int = 0, size: tuple[int, int] = (30, 22)):
    """``count`` (name, JPEG bytes, label index) triples, labels cycling over CORPUS_CLASSES."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append((f"sample{i:04d}", buffer.getvalue(), i % len(CORPUS_CLASSES)))
    return images


def write_class_folder(root: str | Path, images) -> Path:
    """The images as a class folder: ``<class>/<name>.jpg`` with the very same bytes."""
    root = Path(root)
    for name, data, label in images:
        path = root / CORPUS_CLASSES[label] / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def make_llava(root: str | Path, images) -> Path:
    """LLaVA-1.5 JSON (``llava_v1_5_mix665k.json`` style) beside its image folders; one image
    used by two conversations and one text-only record, as in the real file. Returns it."""
    root = Path(root)
    entries = []
    for i, (name, data, _) in enumerate(images):
        relative = f"{'coco/train2017' if i % 2 else 'gqa/images'}/{name}.jpg"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
        conversation = [{"from": "human", "value": "<image>\nWhat is it?"},
                        {"from": "gpt", "value": "A test pattern."}]  # fmt: skip
        entries.append({"id": f"{i:09d}", "image": relative, "conversations": conversation})
    entries.append({"id": "dup", "image": entries[0]["image"], "conversations": []})
    entries.append({"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}]})
    file = root / "llava_v1_5_mix665k.json"
    file.write_text(json.dumps(entries))
    return file


def make_wds(folder: str | Path, images, *, per_shard: int = 3, label: str = "cls") -> list[Path]:
    """webdataset shards ``<folder>/000000.tar``, ... as img2dataset writes them: per sample
    ``<key>.jpg``, ``<key>.txt`` (caption), ``<key>.json`` and, with ``label="cls"``,
    ``<key>.cls``; with ``label="json"`` the label is the json's ``label``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(images), per_shard):
        path = folder / f"{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data, label_index in images[start : start + per_shard]:
                meta = {"key": name, "caption": "a test", "width": 30, "height": 22}
                if label == "json":
                    meta["label"] = label_index
                members = {"jpg": data, "txt": b"a test", "json": json.dumps(meta).encode()}
                if label == "cls":
                    members["cls"] = str(label_index).encode()
                for ext, content in members.items():
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        shards.append(path)
    return shards


def make_hf_parquet(root: str | Path, images, *, files: int = 2, row_group: int = 2) -> Path:
    """A hub dataset folder: ``data/train-0000i-of-0000N.parquet`` with an ``image`` column of
    {bytes, path} structs, a ``label`` ClassLabel column (names in the ``huggingface`` schema
    metadata, as ``datasets`` writes it) and ``row_group`` rows per row group. Returns root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    features = {
        "image": {"_type": "Image"},
        "label": {"names": list(CORPUS_CLASSES), "_type": "ClassLabel"},
    }
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema(
        [
            pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            pa.field("label", pa.int64()),
        ],
        metadata=metadata,
    )
    per_file = -(-len(images) // files)
    for i in range(files):
        chunk = images[i * per_file : (i + 1) * per_file]
        table = pa.table(
            {
                "image": [{"bytes": data, "path": f"{name}.jpg"} for name, data, _ in chunk],
                "label": [label for _, _, label in chunk],
            },
            schema=schema,
        )
        pq.write_table(table, root / "data" / f"train-{i:05d}-of-{files:05d}.parquet",
                       row_group_size=row_group)  # fmt: skip
    (root / "README.md").write_text("---\ndataset_info: generated\n---\n")
    return root
