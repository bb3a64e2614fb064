"""webdataset tar shards (the convention of img2dataset, clip-retrieval and LAION), read with
plain ``tarfile``: no webdataset dependency.

Rules (tested in tests/test_corpora.py):
  - ``--data`` is a shard path or pattern ending in ``.tar``: one file, a brace pattern
    (``shards/{000000..000127}.tar``: numeric ranges keep the first bound's zero padding;
    ``{a,b}`` lists; several braces multiply), a glob (``shards/*.tar``), locally or at any
    fsspec URL (``s3://bucket/shards/{0000..0099}.tar``). The folder above the first brace or
    glob is listed once (one fsspec ``find``, not one request per shard); a shard of the
    pattern missing from that listing is a ``ManifestError`` naming it. A pattern naming more
    than ``MAX_SHARDS`` (10^6) shards is refused before it is expanded (tested in
    tests/test_trust_datasets.py). Uncompressed tars only (members are read back by offset).
  - Members group into samples as webdataset groups them: the key is the member path up to
    the first dot of its file name, the extension what follows (lower-cased). A sample's image
    is its ``jpg``, ``jpeg``, ``png`` or ``webp`` member (first of these); samples without one
    are not images and are left out. The label is the integer or class name in ``cls``, else
    the ``label`` of ``json``, else none (then every label is -1); labels follow the manifest
    rules (all integers or all names). A ``json`` member that is not JSON (nested too deep
    included) is a ``ManifestError`` naming the sample and shard.
  - Ids are ``<shard>/<key>``, the shard being its path relative to the listed folder without
    ``.tar``, so rows stay stable when shards move. The split is the shard's parent folder
    when that is a split name (``train/000.tar``), else "train". A key twice in one shard is a
    ``ManifestError``.
  - Each record reads its image by (shard, offset, size) (``TarMember``); a member that cannot
    be read, or bytes that do not decode, make that image unreadable: a recorded skip under
    ``--on-bad-image skip``, as for a corrupt file.
Cost: a tar has no index, so planning walks every member header of every shard (locally a
seek per member; over fsspec URLs, reads through the shard's blocks, close to one download of
each shard per planning process, Dask workers included). benchmarks/plan_scale.py measures
the local case.
"""

from __future__ import annotations

import itertools
import math
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from featcache.datasets.core import (
    SPLIT_NAMES,
    DataOptions,
    Dataset,
    ManifestError,
    Reader,
    Record,
    parse_json,
)
from featcache.datasets.labels import parse_labels_if_any
from featcache.errors import BadImageError

__all__ = [
    "IMAGE_KEYS",
    "MAX_SHARDS",
    "READER",
    "TarMember",
    "detect",
    "expand_braces",
    "list_shards",
    "load",
]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# the most names a brace pattern may expand to: 10^10 samples at webdataset's usual 10,000 a
# shard, more than a Dataset holds in memory; checked before anything is expanded
MAX_SHARDS = 1_000_000
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_SAMPLE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


def detect(path: str) -> bool:
    """A ``.tar`` path, brace pattern or glob (local or URL)."""
    return path.lower().endswith(".tar")


def _group(body: str, pattern: str) -> range | list[str]:
    """The choices of one brace group: a ``range`` for ``{A..B}`` (not expanded yet), else
    the ``{x,y}`` list."""
    match = _RANGE.fullmatch(body)
    if match:
        first, last = int(match[1]), int(match[2])
        step = 1 if last >= first else -1
        return range(first, last + step, step)
    if "," in body:
        return body.split(",")
    raise ManifestError(
        f"Expected brace groups {{A..B}} (numbers) or {{x,y}} in --data. Got "
        f"{{{body}}} in {pattern!r} instead."
    )


def expand_braces(pattern: str) -> list[str]:
    """Every name of a brace pattern, in order: ``a{1..3}`` -> a1 a2 a3; ``{x,y}`` -> x y.
    A pattern of more than ``MAX_SHARDS`` names is a ``ManifestError``, raised before any name
    is made."""
    parts = _BRACE.split(pattern)  # literal, brace body, literal, ...
    groups = [_group(body, pattern) for body in parts[1::2]]
    count = math.prod(len(group) for group in groups)
    if count > MAX_SHARDS:
        sizes = " x ".join(str(len(group)) for group in groups)
        sizes = f" ({sizes})" if len(groups) > 1 else ""
        raise ManifestError(
            f"Expected a --data pattern naming at most {MAX_SHARDS} shards. Got {pattern}, "
            f"which names {count}{sizes}, instead."
        )
    choices = []
    for body, group in zip(parts[1::2], groups, strict=True):
        if isinstance(group, range):
            first = body.split("..")[0]
            width = len(first) if first.startswith("0") else 0
            choices.append([str(v).zfill(width) for v in group])
        else:
            choices.append(group)
    literals = parts[0::2]
    return [
        "".join(itertools.chain.from_iterable(zip(literals, picked, strict=False))) + literals[-1]
        for picked in itertools.product(*choices)
    ]


def list_shards(pattern: str) -> tuple[str, list[str]]:
    """(listed folder, shard paths or URLs in pattern order; a glob's matches sorted), from
    one listing of the deepest folder above every brace and glob character."""
    import fsspec

    names = expand_braces(pattern)
    fs = fsspec.core.url_to_fs(names[0])[0]
    protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
    paths = [fsspec.core.url_to_fs(name)[1] for name in names]  # protocol stripped
    heads = [re.split(r"[*?[]", path)[0] for path in paths]
    folder = posixpath.dirname(os.path.commonprefix(heads))
    try:
        listed = set(fs.find(folder))
    except OSError as err:
        raise ManifestError(f"Expected to list {protocol}{folder} for --data. Got {err}.") from None
    globs = [re.compile(_glob_regex(path)) for path in paths if path != re.split(r"[*?[]", path)[0]]
    wanted = [path for path in paths if not any(c in path for c in "*?[")]
    wanted += sorted(name for name in listed if any(g.fullmatch(name) for g in globs))
    missing = [name for name in wanted if name not in listed]
    if missing or not wanted:
        first = f"{protocol}{missing[0]}" if missing else pattern
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ManifestError(
            f"Expected every shard of --data {pattern} to exist. Got {first} missing{more} instead."
        )
    return f"{protocol}{folder}", [f"{protocol}{name}" for name in wanted]


def _glob_regex(pattern: str) -> str:
    return "".join({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)) for char in pattern)


def _open(url: str) -> Any:
    """A binary file object: the builtin one for local paths (fsspec's local file is slower
    at the many small seeks of a tar listing), fsspec's for URLs."""
    if "://" not in url:
        return open(url, "rb")  # noqa: SIM115  (the caller closes it)
    import fsspec

    return fsspec.open(url, "rb").open()


@dataclass(frozen=True)
class TarMember:
    """One member's bytes: ``size`` bytes at ``offset`` of the tar file at ``url``."""

    url: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with _open(self.url) as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as err:
            raise BadImageError(self.url, f"cannot read the tar member: {err}") from err
        if len(data) != self.size:
            raise BadImageError(
                self.url, f"tar member truncated ({len(data)} of {self.size} bytes)"
            )
        return data


def _samples(url: str) -> dict[str, dict[str, tarfile.TarInfo | bytes]]:
    """key -> {extension: TarInfo (image) or bytes (cls / json)}, in member order."""
    samples: dict[str, dict] = {}
    try:
        with _open(url) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                match = _SAMPLE.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                key, ext = match[1], match[2].lower()
                sample = samples.setdefault(key, {})
                if ext in sample:
                    raise ManifestError(
                        f"Expected each key once in {url}. Got {member.name!r} twice instead."
                    )
                if ext in ("cls", "json"):
                    extracted = tar.extractfile(member)
                    sample[ext] = extracted.read() if extracted else b""
                else:
                    sample[ext] = member
    except (OSError, tarfile.TarError) as err:
        raise ManifestError(f"Expected an uncompressed tar shard {url}. Got {err}.") from None
    return samples


def _label(sample: dict, where: str):
    if "cls" in sample:
        return sample["cls"].decode("utf-8", "replace").strip()
    if "json" in sample:
        try:
            meta = parse_json(sample["json"])
        except ValueError as err:
            raise ManifestError(f"Expected JSON in {where}. Got {err}.") from None
        if isinstance(meta, dict) and "label" in meta:
            return meta["label"]
    return None


def load(pattern: str, options: DataOptions) -> Dataset:
    """Read the samples of every shard of ``pattern`` (rules in the module doc)."""
    options.check("webdataset tar shards", (), pattern)
    root, shards = list_shards(pattern)
    entries = []  # (where, id, split, member, label value)
    for url in shards:
        shard = url[len(root) :].lstrip("/")[: -len(".tar")]
        parent = posixpath.basename(posixpath.dirname(shard))
        split = parent if parent in SPLIT_NAMES else "train"
        for key, sample in _samples(url).items():
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if image is None:
                continue
            where = f"sample {key!r} of {url}"
            member = TarMember(url, image.offset_data, image.size)
            entries.append((where, f"{shard}/{key}", split, member, _label(sample, where)))
    if not entries:
        raise ManifestError(
            f"Expected samples with a {', '.join(IMAGE_KEYS)} member in {pattern}. Got none."
        )
    labels, classes = parse_labels_if_any([(entry[0], entry[4]) for entry in entries])
    records = [
        Record(rid, member.url, label, split, None, member=member)
        for (_, rid, split, member, _), label in zip(entries, labels, strict=True)
    ]
    records.sort(key=lambda r: r.id)
    source = pattern if "://" in pattern else os.path.abspath(pattern)
    return Dataset(source, root, classes, tuple(records), format="webdataset")


READER = Reader("webdataset", "path", detect, load)
