r"""Decoding img/s per worker: threads against processes, for 1..N workers.

Extraction decodes each image once and preprocesses it for every encoder of the run on a pool
of ``--num-workers`` threads (``featcache.extract``). A GPU running ViT-L/14 at 336 px in bf16
needs several hundred decoded, resized images per second, so this measures whether that pool
scales with workers or is held back by the GIL, in which case processes would be needed.

Per image, the work of ``featcache.extract.decode._prepare`` for one encoder: read and decode the
JPEG (``featcache.images.decode_image``: EXIF, RGB), then the encoder's own preprocessing
(``Encoder.preprocess``: resize the shorter side, centre crop, to float, normalise) into a
``(3, H, W)`` float32 tensor. Default: the ``dinov2-l`` preset's preprocessing (336 px,
bicubic), built with one block (the preprocessing is the preset's; the weights are unused).

  threads    ``ThreadPoolExecutor(workers).map`` over the images, results in the calling process
  processes  ``ProcessPoolExecutor(workers)`` (fork), chunks of 8 images; the tensors come
             back pickled, as a process pool would hand them to the compute thread

For each worker count (default 1 .. the cores available), each way is warmed up, then timed
``--repeats`` times alternately; each keeps its fastest repeat. img/s per worker = img/s ÷
workers; scaling = img/s ÷ img/s of the same way with the fewest workers measured. For
threads, CPU ÷ wall (this process's CPU seconds over wall seconds) near the worker count
means the threads decode in parallel (PIL and torch release the GIL); near 1, the GIL (or a
busy machine: the load average is printed) serialises them. The data is ``--images``
generated JPEGs of ``--size`` (``benchmarks/_jpegs.py``).

    .venv/bin/python benchmarks/decode_throughput.py                   # ~30 s on 2 cores
    .venv/bin/python benchmarks/decode_throughput.py --workers 1,2,4 --json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
import torch
from _jpegs import make_jpeg_folder
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from featcache.encoders import load_encoder  # noqa: E402
from featcache.images import decode_image  # noqa: E402
from featcache.preprocess import Preprocessing  # noqa: E402

_PREPROCESSING: Preprocessing | None = None  # set before the pools start (fork inherits it)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dinov2-l", help="whose preprocessing to apply")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", default="500x375", help="JPEG width x height")
    parser.add_argument(
        "--workers",
        default=",".join(str(w) for w in sorted({1, cores})),
        help="worker counts, comma-separated (default: 1 and the cores available)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def prepare(path: str) -> torch.Tensor:
    """What extraction does per image and encoder: decode, then the encoder's preprocessing."""
    from featcache.images import upright_rgb

    return _PREPROCESSING(upright_rgb(decode_image(path)))


def _one_thread() -> None:
    torch.set_num_threads(1)  # a process worker: no intra-op threads competing with the others


def timed(pool: Executor, paths: list[str], chunksize: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: the threads' work, not the processes')."""
    started, cpu = time.perf_counter(), time.process_time()
    for tensor in pool.map(prepare, paths, chunksize=chunksize):
        assert tensor.ndim == 3
    return time.perf_counter() - started, time.process_time() - cpu


def measure(args: argparse.Namespace) -> dict:
    global _PREPROCESSING
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="featcache-decode-"))
    width, height = (int(v) for v in args.size.split("x"))
    folder = make_jpeg_folder(scratch / "jpegs", args.images, size=(width, height))
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    kilobytes = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    encoder = load_encoder(args.model, random_init=True, depth=1)
    _PREPROCESSING = encoder.preprocessing
    torch.set_num_threads(1)  # torchvision's resize/normalise must not borrow the other cores
    context = multiprocessing.get_context("fork")
    load_before = os.getloadavg()
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        ways = {
            "threads": (ThreadPoolExecutor(workers), 1),
            "processes": (
                ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread),
                8,
            ),
        }
        seconds: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for pool, chunksize in ways.values():
            timed(pool, paths[: 4 * workers], chunksize)  # warm-up (processes start here)
        for _ in range(args.repeats):
            for way, (pool, chunksize) in ways.items():
                seconds[way].append(timed(pool, paths, chunksize))
        for pool, _ in ways.values():
            pool.shutdown()
        for way, times in seconds.items():
            wall, cpu = min(times)
            rate = len(paths) / wall
            rows.append(
                {"way": way, "workers": workers, "images_per_s": rate,
                 "images_per_s_per_worker": rate / workers,
                 "threads_cpu_per_wall": cpu / wall if way == "threads" else None,
                 "seconds": [t for t, _ in times]}
            )  # fmt: skip
    for row in rows:
        single = min((r for r in rows if r["way"] == row["way"]), key=lambda r: r["workers"])
        row["scaling"] = row["images_per_s"] / single["images_per_s"]
    if args.dir is None:
        shutil.rmtree(scratch)
    return {
        "benchmark": "decode_throughput",
        "model": args.model,
        "preprocessing": encoder.preprocessing.to_dict(),
        "images": len(paths),
        "jpeg_size": [width, height],
        "jpeg_kb_mean": kilobytes,
        "repeats": args.repeats,
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
        "rows": rows,
    }


def print_tables(result: dict) -> None:
    console = Console()
    size = "x".join(map(str, result["jpeg_size"]))
    console.print(
        f"{result['images']} JPEGs of {size} px ({result['jpeg_kb_mean']:.0f} KB), "
        f"{result['model']} preprocessing to "
        f"{'x'.join(map(str, result['preprocessing']['image_size']))}, {result['cores']} cores, "
        f"{result['repeats']} repeats, load {result['load_average_1min'][0]:.2f} -> "
        f"{result['load_average_1min'][1]:.2f}"
    )
    table = Table(title="decode + preprocess, img/s (fastest repeat)")
    columns = ("way", "workers", "img/s", "img/s per worker", "scaling", "threads CPU ÷ wall")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            row["way"],
            str(row["workers"]),
            f"{row['images_per_s']:.1f}",
            f"{row['images_per_s_per_worker']:.1f}",
            f"{row['scaling']:.2f}",
            "-" if row["threads_cpu_per_wall"] is None else f"{row['threads_cpu_per_wall']:.2f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
