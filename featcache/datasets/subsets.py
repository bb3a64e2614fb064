"""Class-balanced subsets as the paper builds them: seeded, deterministic, in the manifest hash.

``--per-class`` takes one of two forms:
  - ``N``: every split keeps N images of each class, drawn from itself.
  - ``SPLIT=N,SPLIT=N`` (e.g. ``train=230,test=26``, fMoW; ``train=200,test=50``, iNat): the
    named splits are drawn disjointly, class by class, from the source splits
    (``--subset-from``, default ``train``; several are pooled, e.g. ``train,val``), and the
    dataset then holds only the named splits.

The draw for class c: its source images sorted by id, permuted by
``np.random.default_rng([seed, h(c)])`` with h(c) the first 8 bytes of sha256(class name), and
cut in the order the splits are named (the first N1 to the first split, the next N2 to the
second). Each class's draw depends only on the seed, its name and its own images, so two
people with the same dataset get the same records, and adding images of one class leaves the
others' draws alone. A class with fewer images than it needs (N, or N1 + N2 + ...) is an error
naming it (``--short-classes error``, the default) or is left out of every split
(``--short-classes drop``; labels are then re-indexed over the classes kept, in their order).
What was asked enters ``Dataset.selection["subset"]``, so the manifest hash tells subsets
apart even where they happen to hold the same ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from featcache.datasets.core import DataOptions, Dataset, ManifestError, Record

__all__ = [
    "SubsetPlan",
    "class_balanced",
    "class_seed",
    "describe",
    "parse_per_class",
    "plan_subset",
]

_SPLIT_COUNT = re.compile(r"([A-Za-z0-9_.-]+)=(\d+)")
_ACCEPTED = "N or SPLIT=N,SPLIT=N (e.g. 230, or train=230,test=26) with N >= 1"


def parse_per_class(text: str) -> int | dict[str, int]:
    """ "N" -> N; "train=230,test=26" -> {"train": 230, "test": 26} (order kept)."""
    text = text.strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    counts: dict[str, int] = {}
    for part in text.split(","):
        match = _SPLIT_COUNT.fullmatch(part.strip())
        if match is None or int(match[2]) < 1 or match[1] in counts:
            raise ManifestError(f"Expected --per-class {_ACCEPTED}. Got {text!r} instead.")
        counts[match[1]] = int(match[2])
    return counts


@dataclass(frozen=True)
class SubsetPlan:
    """What a subset holds before it is taken (``featcache dataset describe`` prints it).

    Attributes:
        counts: output split -> images per class.
        sources: output split -> the source splits it is drawn from.
        available: output split -> class name -> images of that class in its sources.
        short: class name -> (images available, images needed), for classes too small.
        seed: the draw's seed.
    """

    counts: dict[str, int]
    sources: dict[str, tuple[str, ...]]
    available: dict[str, dict[str, int]]
    short: dict[str, tuple[int, int]]
    seed: int


def plan_subset(dataset: Dataset, options: DataOptions) -> SubsetPlan:
    """Check ``options.per_class`` against ``dataset`` and count what each class can give."""
    if not dataset.classes:
        raise ManifestError(
            f"Expected a labelled dataset for --per-class (its classes are balanced). "
            f"Got {dataset.source}, which has no labels, instead."
        )
    asked = parse_per_class(options.per_class or "")
    present = dataset.splits()
    if isinstance(asked, int):
        if options.subset_from is not None:
            raise ManifestError(
                f"Expected --subset-from only with --per-class SPLIT=N,... (N alone draws each "
                f"split from itself). Got --per-class {options.per_class} with --subset-from "
                f"{options.subset_from} instead."
            )
        counts = {split: asked for split in present}
        sources = {split: (split,) for split in present}
    else:
        text = options.subset_from or ("train" if "train" in present else present[0])
        pooled = tuple(name.strip() for name in text.split(","))
        missing = [name for name in pooled if name not in present]
        if missing or not all(pooled):
            raise ManifestError(
                f"Expected --subset-from to name splits of {dataset.source} "
                f"({', '.join(present)}). Got {text!r} instead."
            )
        counts = dict(asked)
        sources = {split: pooled for split in counts}
    available: dict[str, dict[str, int]] = {}
    needed: Counter[str] = Counter()
    for split, pooled in sources.items():
        labels = Counter(r.label for r in dataset.records if r.split in pooled)
        available[split] = {name: labels.get(i, 0) for i, name in enumerate(dataset.classes)}
    for group in {pooled for pooled in sources.values()}:
        # splits drawn from the same sources share each class's images
        total = sum(counts[s] for s, pooled in sources.items() if pooled == group)
        first = next(s for s, pooled in sources.items() if pooled == group)
        for name, have in available[first].items():
            if have < total:
                needed[name] = max(needed[name], total)
    short = {
        name: (min(available[s][name] for s in sources), needed[name]) for name in sorted(needed)
    }
    return SubsetPlan(counts, sources, available, short, options.subset_seed)


def class_seed(seed: int, name: str) -> list[int]:
    """The seed of class ``name``'s draw: ``[seed, h(name)]``, h the first 8 bytes of
    sha256(name) (also the held-out test split's, featcache/datasets/holdout.py)."""
    return [seed, int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")]


def class_balanced(dataset: Dataset, options: DataOptions) -> Dataset:
    """The subset ``options`` asks for (rules in the module doc), a new ``Dataset``."""
    plan = plan_subset(dataset, options)
    if plan.short and options.short_classes != "drop":
        listed = ", ".join(
            f"{name!r} ({have} of {need})" for name, (have, need) in list(plan.short.items())[:5]
        )
        more = f" and {len(plan.short) - 5} more" if len(plan.short) > 5 else ""
        raise ManifestError(
            f"Expected every class of {dataset.source} to have the images --per-class "
            f"{options.per_class} needs (or --short-classes drop to leave small classes out). "
            f"Got {listed}{more} instead."
        )
    old_labels = [label for label, name in enumerate(dataset.classes) if name not in plan.short]
    kept = [dataset.classes[label] for label in old_labels]
    relabel = {old: new for new, old in enumerate(old_labels)}
    records: list[Record] = []
    for group in dict.fromkeys(plan.sources.values()):  # each distinct source, in split order
        splits = [s for s, pooled in plan.sources.items() if pooled == group]
        by_class: dict[int, list[Record]] = {}
        for record in dataset.records:  # sorted by id
            if record.split in group and record.label in relabel:
                by_class.setdefault(record.label, []).append(record)
        for label, members in by_class.items():
            name = dataset.classes[label]
            order = np.random.default_rng(class_seed(plan.seed, name)).permutation(len(members))
            start = 0
            for split in splits:
                for i in order[start : start + plan.counts[split]]:
                    records.append(
                        dataclasses.replace(members[i], split=split, label=relabel[label])
                    )
                start += plan.counts[split]
    records.sort(key=lambda r: r.id)
    subset = {
        "per_class": plan.counts,
        "from": {split: list(pooled) for split, pooled in plan.sources.items()},
        "seed": plan.seed,
        "dropped": sorted(plan.short) if plan.short else [],
    }
    return dataclasses.replace(
        dataset,
        classes=tuple(kept),
        records=tuple(records),
        selection={**dataset.selection, "subset": subset},
    )


def describe(dataset: Dataset, options: DataOptions) -> dict:
    """JSON-ready summary of ``dataset`` (read without a subset) and, when
    ``options.per_class`` is set, of the subset it would give: classes, images per class per
    split, and per subset split its size, sources and the classes too small to fill it."""
    splits = {}
    for split in dataset.splits():
        labels = Counter(r.label for r in dataset.split(split))
        splits[split] = {
            "images": sum(labels.values()),
            "per_class": {name: labels.get(i, 0) for i, name in enumerate(dataset.classes)},
        }
    summary = {
        "source": dataset.source,
        "format": dataset.format,
        "selection": dataset.selection,
        "classes": list(dataset.classes),
        "splits": splits,
    }
    if options.per_class is not None:
        plan = plan_subset(dataset, options)
        kept = len(dataset.classes) - len(plan.short)
        summary["subset"] = {
            "per_class": plan.counts,
            "from": {split: list(pooled) for split, pooled in plan.sources.items()},
            "seed": plan.seed,
            "short_classes": {name: {"have": h, "need": n} for name, (h, n) in plan.short.items()},
            "holds": {
                split: {"images": count * kept, "classes": kept}
                for split, count in plan.counts.items()
            },
        }
    return summary
