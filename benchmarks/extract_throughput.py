r"""Extraction throughput ÷ bare forward throughput of the same encoder, batch and thread count.

Goal (issue): >= 0.9 on CPU with a small encoder, i.e. decoding, preprocessing, the float16
cast and the store writes are hidden behind (overlapped with) the encoder's compute.

For each torch thread count, side by side in one process:

  bare     images decoded and preprocessed beforehand and stacked into the very batches
           extraction forms (batches never cross shard boundaries); timed: only
           ``encoder.run_layers(batch, layers)`` under ``torch.inference_mode()``
  extract  ``run_extraction`` into a fresh local store (same encoder, layers, batch size,
           shard size, torch threads; ``--workers`` decoding threads); timed: the whole call
           (store creation, decoding, compute, float16 cast, writes, markers, summary)

Both are warmed up once (one bare batch, one extraction of a small separate dataset) and then
run ``--repeats`` times alternately (bare, extract, bare, extract, ...). Other processes on the
machine only ever add time, so images/s come from each side's fastest repeat and the headline
ratio is best(bare s) / best(extract s); the median of the per-repeat (paired) ratios is shown
beside it, with the load average, so a disturbed run shows as a gap between the two. The
extraction's own ``timings`` split (seconds the main thread waited for decoded images,
computed, waited for writes; seconds the writer thread wrote) is from its fastest repeat.

``--baseline FILE`` also times ``run_extraction`` from another copy of ``featcache/extract.py``,
the one-file module the ``featcache/extract/`` package was split from (e.g. ``git show
6031ead:featcache/extract.py > /tmp/before.py``), in the same repeats, so a before/after claim
is a ratio measured side by side in one run.

Default encoder: ``timm:vit_small_patch14_dinov2`` with random weights at ``--img-size 112``
(ViT-S/14: 12 blocks, width 384, 65 tokens). Its forward (~23 ms an image on one core) costs
~13x decoding+preprocessing a 224 px PNG (~1.8 ms), a real encoder's regime; the
``dinov2-tiny`` preset (~1.3 ms) is cheaper than decoding, which no overlap can hide on a CPU.

    .venv/bin/python benchmarks/extract_throughput.py                  # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/extract_throughput.py --threads 2 --json
    .venv/bin/python benchmarks/extract_throughput.py --model dinov2-tiny --img-size 0 \
        --layers 2,4,6
    .venv/bin/python benchmarks/extract_throughput.py --baseline /tmp/before.py     # ~2.5 min
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import featcache.extract  # noqa: E402
from featcache.demo_data import make_demo_dataset  # noqa: E402
from featcache.encoders import Encoder, load_encoder  # noqa: E402
from featcache.images import decode_image  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="timm:vit_small_patch14_dinov2")
    parser.add_argument(
        "--img-size", type=int, default=112, help="img_size override for timm models (0: none)"
    )
    parser.add_argument("--layers", default="4,8,12", help="layers to store, e.g. 4,8,12")
    parser.add_argument("--images", type=int, default=192, help="images in the dataset")
    parser.add_argument("--image-px", type=int, default=224, help="side of the PNGs to decode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument(
        "--threads",
        default=",".join(str(t) for t in sorted({1, cpus})),
        help="torch thread counts to measure, comma-separated (default: 1 and all cores)",
    )
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (num_workers)")
    parser.add_argument("--compression", default="none", help="store compression")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="FILE",
        help="also time run_extraction from this copy of extract.py (repeatable)",
    )
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Encoder:
    overrides = {"img_size": args.img_size} if args.img_size else {}
    return load_encoder(args.model, random_init=True, **overrides)


def make_dataset(root: Path, images: int, image_px: int) -> Path:
    """All-train shapes dataset (with masks, as the demo data has) of ~``images`` PNGs."""
    per_class = math.ceil(images / 4)
    return make_demo_dataset(root, num_classes=4, per_class=per_class, size=image_px,
                             test_fraction=0.0)  # fmt: skip


def load_variant(path: str, number: int):
    """A copy of featcache/extract.py, imported as its own module."""
    name = f"extract_baseline_{number}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def config_for(module, args, manifest: Path, out: Path, encoder: Encoder):
    return module.ExtractConfig(
        models=[encoder.name],
        data=str(manifest),
        out=str(out),
        layers=[int(n) for n in args.layers.split(",")],
        batch_size=args.batch_size,
        device="cpu",
        compression=args.compression,
        num_workers=args.workers,
        shard_size=args.shard_size,
    )


def bare_batches(plan, encoder: Encoder, batch_size: int, shard_size: int) -> list[torch.Tensor]:
    """The batches extraction forms (per shard, consecutive rows), decoded beforehand."""
    inputs = [encoder.preprocess(decode_image(r.path, name=r.id)) for r in plan.records]
    batches = []
    for start in range(0, len(inputs), shard_size):
        shard = inputs[start : start + shard_size]
        for offset in range(0, len(shard), batch_size):
            batches.append(torch.stack(shard[offset : offset + batch_size]))
    return batches


def time_bare(encoder: Encoder, batches: list[torch.Tensor], layers: tuple[int, ...]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            encoder.run_layers(batch, layers)
    return time.perf_counter() - started


def time_extract(module, args, manifest: Path, out: Path, encoder: Encoder) -> tuple[float, dict]:
    plan = module.plan_extraction(config_for(module, args, manifest, out, encoder), [encoder])
    started = time.perf_counter()
    result = module.run_extraction(plan)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return seconds, result["timings"]


def measure(args: argparse.Namespace) -> dict:
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="featcache-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    manifest = make_dataset(scratch / "data", args.images, args.image_px)
    warm_manifest = make_dataset(scratch / "warm", 2 * args.batch_size, args.image_px)
    encoder = load(args)
    variants = {"featcache.extract": featcache.extract}
    for number, path in enumerate(args.baseline):
        variants[f"baseline {path}"] = load_variant(path, number)
    module = featcache.extract
    plan = module.plan_extraction(
        config_for(module, args, manifest, scratch / "plan", encoder), [encoder]
    )
    layers = plan.specs[0].layers
    batches = bare_batches(plan, encoder, args.batch_size, args.shard_size)
    count = len(plan.records)
    load_before = os.getloadavg()
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        time_bare(encoder, batches[:1], layers)  # warm-up
        for variant in variants.values():
            time_extract(variant, args, warm_manifest, scratch / "warm-out", encoder)
        bare = []
        runs: dict[str, list[tuple[float, dict]]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            bare.append(time_bare(encoder, batches, layers))
            for name, variant in variants.items():
                out = scratch / f"out-{repeat}"
                runs[name].append(time_extract(variant, args, manifest, out, encoder))
        for name, extract in runs.items():
            fastest_s, fastest_timings = min(extract, key=lambda pair: pair[0])
            paired = [b / e for b, (e, _) in zip(bare, extract, strict=True)]
            rows.append(
                {
                    "threads": threads,
                    "extract": name,
                    "bare_images_per_s": count / min(bare),
                    "extract_images_per_s": count / fastest_s,
                    "ratio": min(bare) / fastest_s,
                    "ratio_paired_median": statistics.median(paired),
                    "ratio_per_repeat": paired,
                    "bare_s": bare,
                    "extract_s": [seconds for seconds, _ in extract],
                    "extract_timings_s": fastest_timings,
                    "extract_fastest_s": fastest_s,
                }
            )
    if args.dir is None:
        shutil.rmtree(scratch)
    return {
        "benchmark": "extract_throughput",
        "goal": "extract / bare >= 0.9",
        "model": args.model,
        "img_size": args.img_size or None,
        "encoder": {"depth": encoder.depth, "width": encoder.width, "tokens": encoder.num_tokens},
        "layers": list(layers),
        "images": count,
        "image_px": args.image_px,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "workers": args.workers,
        "compression": args.compression,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "rows": rows,
    }


def print_tables(result: dict) -> None:
    console = Console()
    console.print(
        f"[bold]{result['model']}[/] img_size={result['img_size']} "
        f"(depth {result['encoder']['depth']}, width {result['encoder']['width']}, "
        f"{result['encoder']['tokens']} tokens), layers {result['layers']}, "
        f"{result['images']} images of {result['image_px']} px, batch {result['batch_size']}, "
        f"shard {result['shard_size']}, {result['workers']} decode workers, "
        f"compression {result['compression']}, {result['cpu_count']} CPU cores, "
        f"CUDA {result['cuda']}, {result['repeats']} repeats, load average "
        f"{result['load_average_1min'][0]:.2f} -> {result['load_average_1min'][1]:.2f}"
    )
    table = Table(title="extraction ÷ bare forward (goal >= 0.9)")
    columns = ("torch threads", "extract", "bare img/s", "extract img/s", "ratio", "paired median")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            str(row["threads"]),
            row["extract"],
            f"{row['bare_images_per_s']:.1f}",
            f"{row['extract_images_per_s']:.1f}",
            f"{row['ratio']:.3f}",
            f"{row['ratio_paired_median']:.3f}",
        )
    console.print(table)
    split = Table(title="extraction time split (fastest repeat), seconds")
    columns = ("torch threads", "extract", "total", "wait decode", "compute", "wait write")
    for column in (*columns, "other", "writer busy"):
        split.add_column(column, justify="right")
    for row in result["rows"]:
        t = row["extract_timings_s"]
        other = row["extract_fastest_s"] - t["wait_s"] - t["compute_s"] - t["write_s"]
        split.add_row(
            str(row["threads"]),
            row["extract"],
            f"{row['extract_fastest_s']:.2f}",
            f"{t['wait_s']:.2f}",
            f"{t['compute_s']:.2f}",
            f"{t['write_s']:.2f}",
            f"{other:.2f}",
            f"{t['write_busy_s']:.2f}" if "write_busy_s" in t else "-",
        )
    console.print(split)


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
