"""Store write MB/s ÷ numpy memmap write MB/s for the same array (goal >= 0.9), the cost of
the store's durability against a write just as durable, and reads.

One float16 array shaped like real features, ``(images, tokens, channels)`` (default
``(768, 577, 384)``: ViT-S/14 at 336 px, ~340 MB), is written side by side in one run:

  store     ``FeatureStore.write_shard`` shard by shard into a fresh local store (``--shard-size``
            images a shard), marker with its per-object digests included; once with
            compression ``none`` (the goal's ratio) and once with ``zstd``. A store holds
            every array of its spec: the array as ``layers/1`` and as ``final``, its CLS row
            as ``pooled``, and the small ``ids``, ``labels`` and ``valid``
  memmap    ``np.memmap(..., mode="w+")`` of the same feature bytes (one file per feature
            array), assigned shard by shard, then ``flush()`` (msync: waits for the disk)
  file      ``ndarray.tofile`` of the same feature bytes (page cache, no sync), for reference
  file synced  the same ``tofile`` writes, made as durable as the store's: after each shard,
            ``fsync`` of every file and then of their folder (the store fsyncs each shard's
            objects and every folder up to the store root before its marker, then the marker
            and its folder: ``docs/design.md``, Atomicity)
  store none, no fsync  the store none write with ``os.fsync`` made a no-op (not durable: the
            difference to store none is what the store's fsyncs cost)

Store creation (metadata, fsynced with its folders) is timed apart (``creation_seconds``);
everything from the first shard's bytes to the last marker is the write. MB are the array's
uncompressed bytes (10**6 bytes), so zstd's MB/s is input bytes.
Each write is repeated ``--repeats`` times into fresh files, alternating; each side keeps its
fastest repeat (other processes only add time), and the files are removed in between.

Reads, from the page cache right after a write (whole shards, ``--repeats`` times, fastest):

  store raw       ``group["layers/1"][start:stop]`` (float16 as stored; checksums verified)
  store decoded   ``FeatureStore.read`` (float32, what training reads)
  memmap          ``np.array(memmap[start:stop])``
  memory copy     ``array[start:stop].copy()`` (the ceiling)

    .venv/bin/python benchmarks/store_write.py                 # ~1 min on 2 cores
    .venv/bin/python benchmarks/store_write.py --images 256 --json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from featcache.store import FeatureStore, StoreSpec  # noqa: E402

ARRAY = "layers/1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=577, help="tokens per image (1 + 24*24)")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def make_array(images: int, tokens: int, channels: int) -> np.ndarray:
    """float16 values like layer tokens: roughly normal, a few larger channels."""
    rng = np.random.default_rng(0)
    out = np.empty((images, tokens, channels), np.float16)
    scale = np.ones(channels, np.float32)
    scale[:: max(1, channels // 8)] = 8.0
    for i in range(images):
        out[i] = rng.standard_normal((tokens, channels), np.float32) * scale
    return out


def make_spec(args: argparse.Namespace, compression: str) -> StoreSpec:
    """A store spec with a fake encoder description: ``tokens - 1`` patches and a CLS token."""
    grid = (args.tokens - 1, 1)
    encoder = {
        "name": "bench",
        "depth": 1,
        "width": args.channels,
        "fingerprint": "bench",
        "spec": {},
        "layout": {"prefix": ["cls"], "grid": list(grid)},
        "pooled_width": args.channels,
    }
    dataset = {
        "source": "bench",
        "split": "train",
        "manifest_hash": "bench",
        "classes": [],
        "order_seed": 0,
        "num_images": args.images,
    }
    return StoreSpec(
        encoder=encoder,
        dataset=dataset,
        layers=(1,),
        compression=compression,
        shard_size=args.shard_size,
    )


def shard_bounds(images: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, images)) for s in range(0, images, shard_size)]


def feature_arrays(array: np.ndarray) -> dict[str, np.ndarray]:
    """The store's feature arrays made from ``array``: what every writer writes."""
    return {ARRAY: array, "final": array, "pooled": np.ascontiguousarray(array[:, 0])}


CREATION: dict[str, list[float]] = {}  # per store path name: creation seconds


def write_store(array: np.ndarray, spec: StoreSpec, path: Path) -> float:
    started = time.perf_counter()
    store = FeatureStore.create(str(path), spec)
    CREATION.setdefault(path.name, []).append(time.perf_counter() - started)
    features = feature_arrays(array)
    started = time.perf_counter()
    for shard, (start, stop) in enumerate(shard_bounds(len(array), spec.shard_size)):
        rows = {name: values[start:stop] for name, values in features.items()}
        rows["ids"] = np.array([f"train/class/{i:08d}.jpg" for i in range(start, stop)])
        rows["labels"] = np.zeros(stop - start, np.int64)
        rows["valid"] = np.ones(stop - start, bool)
        store.write_shard(shard, rows, {"rows": [start, stop], "skipped": []})
    return time.perf_counter() - started


def write_memmap(array: np.ndarray, shard_size: int, path: Path) -> float:
    started = time.perf_counter()
    for index, values in enumerate(feature_arrays(array).values()):
        target = np.memmap(f"{path}.{index}", dtype=values.dtype, mode="w+", shape=values.shape)
        for start, stop in shard_bounds(len(values), shard_size):
            target[start:stop] = values[start:stop]
        target.flush()
        del target
    return time.perf_counter() - started


def write_file(array: np.ndarray, shard_size: int, path: Path) -> float:
    started = time.perf_counter()
    for index, values in enumerate(feature_arrays(array).values()):
        with open(f"{path}.{index}", "wb") as handle:
            for start, stop in shard_bounds(len(values), shard_size):
                values[start:stop].tofile(handle)
    return time.perf_counter() - started


def write_store_unsynced(array: np.ndarray, spec: StoreSpec, path: Path) -> float:
    """``write_store`` with ``os.fsync`` a no-op: the store's write without its durability."""
    fsync = os.fsync
    os.fsync = lambda descriptor: None
    try:
        return write_store(array, spec, path)
    finally:
        os.fsync = fsync


def write_file_synced(array: np.ndarray, shard_size: int, path: Path) -> float:
    """``write_file``, each shard then on disk: every file fsynced, then their folder."""
    started = time.perf_counter()
    values = list(feature_arrays(array).values())
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(f"{path}.{i}", "wb")) for i in range(len(values))]
        folder = os.open(path.parent, os.O_RDONLY)
        stack.callback(os.close, folder)
        for start, stop in shard_bounds(len(array), shard_size):
            for handle, rows in zip(handles, values, strict=True):
                rows[start:stop].tofile(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.fsync(folder)
    return time.perf_counter() - started


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    for file in path.parent.glob(f"{path.name}.*"):
        file.unlink()


def fastest(fn: Callable[[], float], repeats: int, cleanup: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        times.append(fn())
        cleanup()
    return min(times)


def measure(args: argparse.Namespace) -> dict:
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="featcache-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    array = make_array(args.images, args.tokens, args.channels)
    megabytes = sum(values.nbytes for values in feature_arrays(array).values()) / 1e6
    read_megabytes = array.nbytes / 1e6
    bounds = shard_bounds(args.images, args.shard_size)
    specs = {c: make_spec(args, c) for c in ("none", "zstd")}
    paths = {
        "store none": scratch / "none.zarr",
        "store zstd": scratch / "zstd.zarr",
        "store none, no fsync": scratch / "unsynced.zarr",
        "memmap": scratch / "array.f16",
        "file": scratch / "array.bin",
        "file synced": scratch / "synced.bin",
    }
    writers = {
        "store none": lambda: write_store(array, specs["none"], paths["store none"]),
        "store zstd": lambda: write_store(array, specs["zstd"], paths["store zstd"]),
        "store none, no fsync": lambda: write_store_unsynced(
            array, specs["none"], paths["store none, no fsync"]
        ),
        "memmap": lambda: write_memmap(array, args.shard_size, paths["memmap"]),
        "file": lambda: write_file(array, args.shard_size, paths["file"]),
        "file synced": lambda: write_file_synced(array, args.shard_size, paths["file synced"]),
    }
    for name in writers:  # warm-up: imports, codec setup, first-touch of the files
        writers[name]()
        remove(paths[name])
    CREATION.clear()
    times: dict[str, list[float]] = {name: [] for name in writers}
    stored_bytes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, write in writers.items():
            times[name].append(write())
            if name.startswith("store"):
                stored_bytes[name] = FeatureStore.open(str(paths[name])).nbytes_stored()
            remove(paths[name])
    write_rows = []
    memmap_s, synced_s = min(times["memmap"]), min(times["file synced"])
    for name, seconds in times.items():
        best = min(seconds)
        creation = CREATION.get(paths[name].name)
        write_rows.append(
            {
                "writer": name,
                "seconds": best,
                "mb_per_s": megabytes / best,
                "ratio_to_memmap": memmap_s / best,
                "ratio_to_file_synced": synced_s / best,
                "stored_mb": stored_bytes.get(name, megabytes * 1e6) / 1e6,
                "creation_seconds": min(creation) if creation else None,
                "all_seconds": seconds,
            }
        )

    # reads: one store of each compression and the memmap, written once more and kept
    write_store(array, specs["none"], paths["store none"])
    write_store(array, specs["zstd"], paths["store zstd"])
    write_memmap(array, args.shard_size, paths["memmap"])
    stores = {c: FeatureStore.open(str(paths[f"store {c}"])) for c in ("none", "zstd")}
    mapped = np.memmap(f"{paths['memmap']}.0", dtype=array.dtype, mode="r", shape=array.shape)
    readers: dict[str, Callable[[int, int], np.ndarray]] = {
        "store none raw": lambda a, b: stores["none"].group[ARRAY][a:b],
        "store none decoded": lambda a, b: stores["none"].read(ARRAY, slice(a, b)),
        "store zstd raw": lambda a, b: stores["zstd"].group[ARRAY][a:b],
        "store zstd decoded": lambda a, b: stores["zstd"].read(ARRAY, slice(a, b)),
        "memmap": lambda a, b: np.array(mapped[a:b]),
        "memory copy": lambda a, b: array[a:b].copy(),
    }
    for name, read in readers.items():  # warm-up, and a check that every reader is lossless
        values = np.concatenate([read(a, b) for a, b in bounds])
        assert np.array_equal(values.astype(np.float16), array), name
    read_times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.repeats):
        for name, read in readers.items():
            started = time.perf_counter()
            for a, b in bounds:
                read(a, b)
            read_times[name].append(time.perf_counter() - started)
    copy_s = min(read_times["memory copy"])
    read_rows = [
        {
            "reader": name,
            "seconds": min(seconds),
            "mb_per_s": read_megabytes / min(seconds),
            "ratio_to_memory_copy": copy_s / min(seconds),
            "all_seconds": seconds,
        }
        for name, seconds in read_times.items()
    ]
    if args.dir is None:
        shutil.rmtree(scratch)
    else:
        for path in paths.values():
            remove(path)
    return {
        "benchmark": "store_write",
        "goal": "store none MB/s / memmap MB/s >= 0.9",
        "durability": "ratio_to_file_synced: file synced seconds / store seconds",
        "shape": list(array.shape),
        "dtype": "float16",
        "megabytes": megabytes,
        "shard_size": args.shard_size,
        "shards": len(bounds),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "write": write_rows,
        "read": read_rows,
    }


def print_tables(result: dict) -> None:
    console = Console()
    console.print(
        f"float16 array {tuple(result['shape'])}, as layers/1, final and pooled: "
        f"{result['megabytes']:.0f} MB of features, "
        f"{result['shards']} shards of {result['shard_size']} images, fastest of "
        f"{result['repeats']}, {result['cpu_count']} CPU cores, load average "
        f"{result['load_average_1min']:.2f}"
    )
    writes = Table(title="writes (goal: store none ÷ memmap >= 0.9)")
    columns = ("writer", "seconds", "MB/s", "÷ memmap", "÷ file synced", "stored MB", "creation s")
    for column in columns:
        writes.add_column(column, justify="right")
    for row in result["write"]:
        creation = row["creation_seconds"]
        writes.add_row(
            row["writer"],
            f"{row['seconds']:.3f}",
            f"{row['mb_per_s']:.0f}",
            f"{row['ratio_to_memmap']:.3f}",
            f"{row['ratio_to_file_synced']:.3f}",
            f"{row['stored_mb']:.0f}",
            "" if creation is None else f"{creation:.3f}",
        )
    console.print(writes)
    reads = Table(title="reads of whole shards, page cache warm")
    for column in ("reader", "seconds", "MB/s", "÷ memory copy"):
        reads.add_column(column, justify="right")
    for row in result["read"]:
        reads.add_row(
            row["reader"],
            f"{row['seconds']:.3f}",
            f"{row['mb_per_s']:.0f}",
            f"{row['ratio_to_memory_copy']:.3f}",
        )
    console.print(reads)


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
