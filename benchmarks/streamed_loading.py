r"""Streamed FeatureLoader ÷ staged in LFM and FFM training; streamed read GB/s ÷ a plain read.

Goals (issue 13, part 3, "streamed training near disk speed"):

  training  streamed samples/s ÷ staged samples/s >= 0.9 for LFM and FFM when compute is the
            bottleneck (default 1 torch thread: the CPU analogue of a GPU run, where the step
            leaves the CPU cores to the loader)
  disk      for a store pair 4x larger than ``--memory-budget``, streamed read GB/s >= 0.8 x a
            plain sequential read of the same shard files, both from a cold page cache

**shard.** One 128-row shard of one LFM array (6.4 MB float16), warm: its object's bytes read
with ``readinto``; zarr's ``arr[start:stop]`` over the whole shard and over all rows but the
first (a partial selection: zarr reads it chunk by chunk); the old loader's zarr read plus
numpy's ``astype(float32)``; and ``FeatureLoader._read_into`` (read, Crc32c, float32, NaN check).

**training.** The library's own step, ``StitchRecipe._loss(stage, batch)``, backward, AdamW,
the loss read back every step (as ``_train_epoch`` runs it), fed by ``FeatureLoader``\s built
with ``StitchRecipe``'s fields, rows, batch size and seed for the stage:

  staged    read into memory once beforehand (``fit``'s choice when the budget allows)
  streamed  ``memory_budget=1``: shards read every epoch by ``--read-workers`` threads
  baseline  with ``--baseline FILE`` (another copy of ``stitchtrain/data/loader.py``, e.g.
            ``git show HEAD:stitchtrain/data/loader.py > /tmp/loader_before.py``): its streamed
            loader, in the same repeats; its batches are checked equal to ``streamed``'s

LFM reads two synthetic stores (``FeatureStore.create`` + ``write_shard``: a source layer of
random float16 tokens and a target that is a fixed linear map of it; 2048 rows of 65 tokens x
384 channels in shards of 128, a linear stitch, batch 256). FFM reads stores extracted from a
generated dataset by two random-init ViT-S cut to 6 blocks (``ffm_cached_vs_live.py``'s pair:
DINOv2 at 112 px, DINOv3 at 128 px), shards of 16, an MLP stitch at position 3, batch 32: the
step runs the 3-block target tail. Each feed is warmed up one epoch, then all run ``--epochs``
epochs in turn, ``--repeats`` times; each keeps its fastest repeat; ratio = staged seconds ÷
feed seconds (the median of per-repeat paired ratios beside it).

**disk.** A synthetic store pair (LFM's two arrays) with as many rows as make the loader's
in-memory size ``--budget-factor`` (4) x ``--memory-budget`` (256 MB), shards of 256. Three
passes over the same shard objects, in turn, ``--repeats`` times, each keeping its fastest:

  sequential  each object of the two arrays opened and read whole into one reused buffer, in
              shard order, one thread: what the disk gives a reader that does nothing else
  streamed    one streamed epoch of a ``FeatureLoader`` with that budget, no training step:
              reads, Crc32c checks, float16 -> float32, shuffle, batches
  baseline    the same with ``--baseline``'s loader

GB/s = stored bytes read ÷ wall seconds of the pass. Cold: before each pass every file of both
stores is ``fsync``\ed and dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``
(no root needed; ``echo 3 > drop_caches`` is not available), and the share of its pages still
resident is measured with ``mincore`` and printed. A VM's virtual disk may still be cached by
its host, so "cold" means the guest's page cache. The same passes warm (no drop) show the
CPU-side ceiling.

    .venv/bin/python benchmarks/streamed_loading.py                     # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/streamed_loading.py --baseline /tmp/loader_before.py --json
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import math
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _synthetic import synthetic_dataset, synthetic_encoder  # noqa: E402

from featcache.demo_data import make_demo_dataset  # noqa: E402
from featcache.encoders import load_encoder  # noqa: E402
from featcache.extract import ExtractConfig, plan_extraction, run_extraction  # noqa: E402
from featcache.store import FeatureStore, StoreSpec  # noqa: E402
from stitchtrain.data.loader import FeatureLoader, Field, default_read_workers, parse_size  # noqa: E402
from stitchtrain.pipeline.fit import StitchRecipe  # noqa: E402
from stitchtrain.train.config import FitConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="shard,training,disk", help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the step")
    parser.add_argument(
        "--read-workers", type=int, default=None, help="reader threads (default: the loader's)"
    )
    parser.add_argument(
        "--baseline", default=None, help="another copy of stitchtrain/data/loader.py"
    )
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lfm-images", type=int, default=2048)
    parser.add_argument("--grid", type=int, default=8, help="synthetic patch grid (plus a CLS)")
    parser.add_argument("--width", type=int, default=384, help="synthetic channels")
    parser.add_argument("--shard-size", type=int, default=128, help="LFM stores' shard size")
    parser.add_argument("--ffm-images", type=int, default=192)
    parser.add_argument("--ffm-shard-size", type=int, default=16)
    parser.add_argument("--memory-budget", default="256MB", help="disk part: loader budget")
    parser.add_argument("--budget-factor", type=float, default=4.0, help="disk: store ÷ budget")
    parser.add_argument("--disk-shard-size", type=int, default=256)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def load_baseline(path: str | None):
    """The ``FeatureLoader`` class of another copy of ``stitchtrain/data/loader.py``, or None."""
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("baseline_loader", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.FeatureLoader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- stores --------------------------------------------------------------------------------------
def _spec(name: str, images: int, args: argparse.Namespace, shard_size: int) -> StoreSpec:
    encoder = synthetic_encoder(name, depth=7, width=args.width, grid=args.grid)
    dataset = synthetic_dataset(images)
    return StoreSpec(encoder=encoder, dataset=dataset, layers=(6,), shard_size=shard_size)


def write_synthetic(root: Path, images: int, args, shard_size: int) -> tuple[str, str]:
    """(source url, target url): layers/6 of the target = that of the source @ W + b."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, args.width**-0.5, (args.width, args.width)).astype(np.float32)
    source = FeatureStore.create(str(root / "source.zarr"), _spec("src", images, args, shard_size))
    target = FeatureStore.create(str(root / "target.zarr"), _spec("tgt", images, args, shard_size))
    tokens = 1 + args.grid * args.grid
    for shard in range(source.num_shards):
        start, stop = source.shard_rows(shard)
        common = {
            "ids": np.array([f"image-{i:07d}" for i in range(start, stop)]),
            "labels": np.zeros(stop - start, np.int64),
            "valid": np.ones(stop - start, bool),
        }
        values = rng.standard_normal((stop - start, tokens, args.width), np.float32)
        info = {"rows": [start, stop], "skipped": []}
        for store, layer in ((source, values), (target, values @ weight)):
            features = {"layers/6": layer, "final": layer, "pooled": layer[:, 0]}
            store.write_shard(shard, {**features, **common}, info)
    return source.url, target.url


def extract_ffm_stores(root: Path, args) -> tuple[str, str]:
    manifest = make_demo_dataset(
        root / "data", num_classes=4, per_class=math.ceil(args.ffm_images / 4), size=128,
        test_fraction=0.0,
    )  # fmt: skip
    encoders = [
        load_encoder(name, random_init=True, img_size=size, depth=6)
        for name, size in (
            ("timm:vit_small_patch14_dinov2", 112),
            ("timm:vit_small_patch16_dinov3", 128),
        )
    ]
    config = ExtractConfig(
        models=[e.name for e in encoders],
        data=str(manifest),
        out=str(root / "stores"),
        layers=[3],
        split="train",
        batch_size=32,
        device="cpu",
        shard_size=args.ffm_shard_size,
    )
    plan = plan_extraction(config, encoders)
    run_extraction(plan)
    return plan.urls[0], plan.urls[1]


# -- training ------------------------------------------------------------------------------------
def run_epochs(recipe: StitchRecipe, stage: str, optimizer, loader, epochs: range) -> dict:
    """``_train_epoch``'s loop without validation; wall, step and wait seconds."""
    sync(recipe.device)
    wait0 = loader.stats.wait_seconds
    started, compute, samples = time.perf_counter(), 0.0, 0
    for epoch in epochs:
        for batch in loader.epoch(epoch):
            step = time.perf_counter()
            loss, _ = recipe._loss(stage, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())
            compute += time.perf_counter() - step
            samples += len(batch["source"])
    sync(recipe.device)
    return {
        "seconds": time.perf_counter() - started,
        "samples": samples,
        "compute_s": compute,
        "wait_s": loader.stats.wait_seconds - wait0,
    }


def train_part(args, stage: str, source: str, target: str, scratch: Path, baseline) -> list[dict]:
    config = FitConfig(
        source=source,
        target=target,
        position=6 if stage == "lfm" else 3,
        out=str(scratch / f"run-{stage}"),
        stitch="linear" if stage == "lfm" else "mlp",
        objective=stage,
        lrs=(1e-3,),
        batch_size=256 if stage == "lfm" else 32,
        random_init=True,
    )
    recipe = StitchRecipe(config)
    common = dict(
        fields=recipe._fields(stage),
        rows=recipe.train_rows,
        batch_size=config.stage_batch_size(stage),
        seed=recipe._seed(stage, 0),
        device=recipe.device,
        return_rows=True,
    )
    staged = FeatureLoader(**common, memory_budget=1 << 62)
    staged.stage()
    workers = {"read_workers": args.read_workers} if args.read_workers else {}
    feeds = {"staged": staged, "streamed": FeatureLoader(**common, memory_budget=1, **workers)}
    same = None
    if baseline is not None:
        feeds["baseline"] = baseline(**common, memory_budget=1)
        first = [b["rows"] for b in feeds["streamed"].epoch(0)]
        again = [b["rows"] for b in feeds["baseline"].epoch(0)]
        same = len(first) == len(again) and all(map(torch.equal, first, again))
    optimizer = torch.optim.AdamW(recipe._trainable(stage), lr=1e-3)
    for loader in feeds.values():
        run_epochs(recipe, stage, optimizer, loader, range(1, 2))
    runs: dict[str, list[dict]] = {name: [] for name in feeds}
    epoch = 2
    for _ in range(args.repeats):
        for name, loader in feeds.items():
            runs[name].append(
                run_epochs(recipe, stage, optimizer, loader, range(epoch, epoch + args.epochs))
            )
        epoch += args.epochs
    best = {name: min(r, key=lambda run: run["seconds"]) for name, r in runs.items()}
    rows = []
    for name, run in best.items():
        paired = [
            s["seconds"] / r["seconds"] for s, r in zip(runs["staged"], runs[name], strict=True)
        ]
        rows.append(
            {
                "stage": stage,
                "feed": name,
                "samples_per_s": run["samples"] / run["seconds"],
                "ratio_to_staged": best["staged"]["seconds"] / run["seconds"],
                "ratio_paired_median": statistics.median(paired),
                "wait_fraction": run["wait_s"] / (run["wait_s"] + run["compute_s"]),
                "steps_per_epoch": len(staged),
                "stored_mb_per_epoch": staged.stats.bytes_read / 1e6,
                "same_batches_as_baseline": same if name == "streamed" else None,
                **run,
            }
        )
    return rows


# -- one shard -----------------------------------------------------------------------------------
def best_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def shard_part(args, source_url: str) -> dict:
    """Ways to read one whole shard of one array (warm page cache), fastest of 15 each."""
    store = FeatureStore.open(source_url)
    array = store.group["layers/6"]
    start, stop = store.shard_rows(1)
    path = f"{source_url}/{store.object_key('layers/6', 1)}"
    buffer = memoryview(bytearray(os.path.getsize(path)))
    rows = np.arange(start, stop)
    loader = FeatureLoader([Field("x", store, "layers/6")], rows, 1, memory_budget=1)
    out = torch.empty((len(rows), *array.shape[1:]))

    def file_bytes() -> None:
        with open(path, "rb", buffering=0) as handle:
            handle.readinto(buffer)

    ways = {
        "shard object's bytes (readinto)": file_bytes,
        "zarr arr[start:stop], whole shard": lambda: array[start:stop],
        "zarr, all rows but the first": lambda: array[start + 1 : stop],
        "zarr + numpy astype(float32) (before)": lambda: array[start:stop].astype(np.float32),
        "loader._read_into (float32, checked)": lambda: loader._read_into(
            loader.fields[0], rows, out
        ),
    }
    stored = array[start:stop].nbytes
    timings = {name: best_ms(way) for name, way in ways.items()}
    floor = timings["shard object's bytes (readinto)"]
    return {
        "rows": int(stop - start),
        "stored_bytes": int(stored),
        "ways": [
            {"way": name, "ms": ms, "gb_per_s": stored / ms / 1e6, "times_file_read": ms / floor}
            for name, ms in timings.items()
        ],
    }


# -- disk ----------------------------------------------------------------------------------------
def store_files(urls: list[str]) -> list[str]:
    return sorted(str(p) for url in urls for p in Path(url).rglob("*") if p.is_file())


def drop_cache(paths: list[str]) -> None:
    """Write back and drop ``paths`` from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_LIBC = ctypes.CDLL(None, use_errno=True)


def resident_fraction(paths: list[str]) -> float:
    """Share of the pages of ``paths`` in the page cache (``mincore``)."""
    page, resident, total = mmap.PAGESIZE, 0, 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
            pages = -(-size // page)
            vector = (ctypes.c_ubyte * pages)()
            address = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(mapped)))
            if _LIBC.mincore(address, ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            resident += sum(byte & 1 for byte in vector)
            total += pages
            del address
            mapped.close()
    return resident / total if total else 0.0


def sequential_read(paths: list[str]) -> int:
    """Read each file whole into one reused buffer, in order; bytes read."""
    largest = max(os.path.getsize(p) for p in paths)
    buffer, total = memoryview(bytearray(largest)), 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            got = 0
            while got < size:
                got += handle.readinto(buffer[got:size])
            total += got
    return total


def disk_part(args, scratch: Path, baseline) -> dict:
    budget = parse_size(args.memory_budget)
    tokens = 1 + args.grid * args.grid
    row_bytes = 8 + 2 * tokens * args.width * 4  # the loader's in-memory size of one row
    images = math.ceil(args.budget_factor * budget / row_bytes)
    urls = write_synthetic(scratch / "disk", images, args, args.disk_shard_size)
    stores = [FeatureStore.open(url) for url in urls]
    fields = [Field("source", stores[0], "layers/6"), Field("target", stores[1], "layers/6")]
    rows = np.arange(images)
    workers = {"read_workers": args.read_workers} if args.read_workers else {}
    loaders = {"streamed": FeatureLoader(fields, rows, 256, memory_budget=budget, **workers)}
    if baseline is not None:
        loaders["baseline"] = baseline(fields, rows, 256, memory_budget=budget)
    if any(loader.staged for loader in loaders.values()):
        raise SystemExit(f"Expected streamed loaders: {loaders['streamed'].nbytes} > {budget}.")
    objects = [
        f"{url}/{store.object_key('layers/6', shard)}"
        for shard in range(stores[0].num_shards)
        for url, store in zip(urls, stores, strict=True)
    ]
    every_file = store_files(urls)
    epoch = [0]

    def streamed(loader) -> int:
        before = loader.stats.bytes_read
        for _ in loader.epoch(epoch[0]):
            pass
        epoch[0] += 1
        return loader.stats.bytes_read - before

    passes = {"sequential": lambda: sequential_read(objects)}
    passes.update(
        {name: (lambda loader=loader: streamed(loader)) for name, loader in loaders.items()}
    )
    results = []
    for cache in ("cold", "warm"):
        runs: dict[str, list[dict]] = {name: [] for name in passes}
        for run in passes.values():  # warm-up (and a warm page cache for "warm")
            run()
        for _ in range(args.repeats):
            for name, run in passes.items():
                if cache == "cold":
                    drop_cache(every_file)
                resident = resident_fraction(objects)
                started = time.perf_counter()
                nbytes = run()
                seconds = time.perf_counter() - started
                runs[name].append({"seconds": seconds, "bytes": nbytes, "resident": resident})
        best = {
            name: min(r, key=lambda run: run["seconds"] / run["bytes"]) for name, r in runs.items()
        }
        floor = best["sequential"]["bytes"] / best["sequential"]["seconds"]
        for name, run in best.items():
            gb = run["bytes"] / run["seconds"]
            paired = [
                (r["bytes"] / r["seconds"]) / (s["bytes"] / s["seconds"])
                for s, r in zip(runs["sequential"], runs[name], strict=True)
            ]
            results.append(
                {
                    "cache": cache,
                    "pass": name,
                    "gb_per_s": gb / 1e9,
                    "ratio_to_sequential": gb / floor,
                    "ratio_paired_median": statistics.median(paired),
                    "resident_before": statistics.mean(r["resident"] for r in runs[name]),
                    **run,
                }
            )
    stored = sum(os.path.getsize(p) for p in objects)
    return {
        "images": images,
        "shard_size": args.disk_shard_size,
        "memory_budget_bytes": budget,
        "loader_bytes_in_memory": loaders["streamed"].nbytes,
        "stored_bytes": stored,
        "rows": results,
    }


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="stitchtrain-streamed-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    baseline = load_baseline(args.baseline)
    parts = args.parts.split(",")
    load_before = os.getloadavg()
    result: dict = {
        "benchmark": "streamed_loading",
        "goals": {
            "training": "streamed samples/s ÷ staged >= 0.9 (LFM and FFM, compute-bound)",
            "disk": "streamed read GB/s ÷ sequential read GB/s >= 0.8 (cold page cache)",
        },
        "threads": args.threads,
        "read_workers": args.read_workers or default_read_workers(),
        "baseline": args.baseline,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if "shard" in parts or "training" in parts:
        lfm = write_synthetic(scratch / "lfm", args.lfm_images, args, args.shard_size)
    if "shard" in parts:
        result["shard"] = shard_part(args, lfm[0])
    if "training" in parts:
        ffm = extract_ffm_stores(scratch / "ffm", args)
        result["training"] = train_part(args, "lfm", *lfm, scratch, baseline)
        result["training"] += train_part(args, "ffm", *ffm, scratch, baseline)
    if "disk" in parts:
        result["disk"] = disk_part(args, scratch, baseline)
    result["load_average_1min"] = [load_before[0], os.getloadavg()[0]]
    if args.dir is None:
        shutil.rmtree(scratch)
    return result


def print_tables(result: dict) -> None:
    console = Console()
    load = result["load_average_1min"]
    console.print(
        f"torch threads {result['threads']}, read workers {result['read_workers']}, "
        f"{result['cpu_count']} cores, device {result['device']}, baseline "
        f"{result['baseline'] or '-'}, load average {load[0]:.2f} -> {load[1]:.2f}"
    )
    if "shard" in result:
        shard = result["shard"]
        title = f"One shard of {shard['rows']} rows, {shard['stored_bytes'] / 1e6:.1f} MB, warm"
        table = Table(title=title)
        for column in ("way", "ms", "GB/s", "÷ file read"):
            table.add_column(column, justify="right")
        for row in shard["ways"]:
            table.add_row(
                escape(row["way"]), f"{row['ms']:.2f}", f"{row['gb_per_s']:.2f}",
                f"{row['times_file_read']:.1f}",
            )  # fmt: skip
        console.print(table)
    if "training" in result:
        table = Table(title="Training fed streamed ÷ staged (goal >= 0.9)")
        for column in ("stage", "feed", "samples/s", "÷ staged", "paired median", "wait fraction"):
            table.add_column(column, justify="right")
        for row in result["training"]:
            table.add_row(
                row["stage"],
                row["feed"],
                f"{row['samples_per_s']:.0f}",
                f"{row['ratio_to_staged']:.3f}",
                f"{row['ratio_paired_median']:.3f}",
                f"{row['wait_fraction']:.3f}",
            )
        console.print(table)
        for row in result["training"]:
            if row["feed"] == "staged":
                console.print(
                    f"{row['stage']}: {row['steps_per_epoch']} steps per epoch, "
                    f"{row['stored_mb_per_epoch']:.0f} MB stored per epoch"
                )
            if row["same_batches_as_baseline"] is not None:
                same = row["same_batches_as_baseline"]
                console.print(f"{row['stage']}: streamed batches equal the baseline's: {same}")
    if "disk" in result:
        disk = result["disk"]
        table = Table(
            title=f"Read GB/s ÷ sequential read, {disk['stored_bytes'] / 1e6:.0f} MB stored, "
            f"loader {disk['loader_bytes_in_memory'] / 1e6:.0f} MB in memory vs budget "
            f"{disk['memory_budget_bytes'] / 1e6:.0f} MB (goal >= 0.8, cold)"
        )
        for column in ("cache", "pass", "GB/s", "÷ sequential", "paired median", "resident before"):
            table.add_column(column, justify="right")
        for row in disk["rows"]:
            table.add_row(
                row["cache"],
                row["pass"],
                f"{row['gb_per_s']:.2f}",
                f"{row['ratio_to_sequential']:.3f}",
                f"{row['ratio_paired_median']:.3f}",
                f"{row['resident_before']:.3f}",
            )
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
