"""Planning at scale ÷ the extraction it plans (goal: a small fraction; peak memory < 1 GB).

Planning is everything ``featcache extract`` does before the first image is decoded, minus
loading the encoders: reading the dataset (listing, parsing, root checks), the manifest hash,
the seeded permutation of the split, the id width of the stores and the shard assignment of a
``--shard I/N`` slice. Two generated datasets:

  manifest   a CSV of ``--rows`` rows (default 1,000,000; ``path,label``, 1000 images per
             class name, at most 1000 classes; the files need not exist for planning)
  tar        ``--members`` samples (default 10,000) in webdataset shards of 1000, each a
             ``jpg`` (one small JPEG) and a ``cls`` member, read through a brace pattern

Also the class-balanced subset of the manifest (``--per-class train=230,test=26``), which runs
on top of the same read.

Each plan runs ``--repeats`` times in a fresh interpreter (so its peak RSS is its own, read from
``getrusage``), keeping the fastest. The extraction it plans is estimated at ``--rate`` images
per second (300: a ViT-B on one GPU), and **ratio = plan seconds ÷ estimated extraction
seconds**.

    .venv/bin/python benchmarks/plan_scale.py                  # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/plan_scale.py --rows 100000 --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Manifest rows.")
    parser.add_argument("--members", type=int, default=10_000, help="Tar samples.")
    parser.add_argument("--rate", type=float, default=300.0, help="Extraction images/s.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per plan (fastest kept).")
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "PER_CLASS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan(data: str, per_class: str) -> dict:
    """One plan, timed by phase (runs in the child interpreter)."""
    from featcache.datasets import DataOptions, load_dataset

    phases = {}
    started = time.perf_counter()
    options = DataOptions(per_class=per_class or None)
    dataset = load_dataset(data, options=options)
    phases["read"] = time.perf_counter() - started
    split = "train"
    mark = time.perf_counter()
    digest = dataset.manifest_hash(split)
    phases["hash"] = time.perf_counter() - mark
    mark = time.perf_counter()
    records = dataset.ordered(split, seed=0)
    phases["permutation"] = time.perf_counter() - mark
    mark = time.perf_counter()
    id_width = max(len(r.id.encode("utf-8")) for r in records)
    shard_size, index, count = 256, 3, 8  # --shard 3/8
    mine = range(index, -(-len(records) // shard_size), count)
    assigned = [records[s * shard_size : (s + 1) * shard_size] for s in mine]
    phases["shards"] = time.perf_counter() - mark
    return {
        "images": len(records),
        "seconds": time.perf_counter() - started,
        "phases": phases,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "manifest_hash": digest,
        "id_width": id_width,
        "shards_of_slice": len(assigned),
    }


def write_manifest(folder: Path, rows: int) -> Path:
    """``rows`` rows of up to 1000 class names (1000 images each where rows allow)."""
    classes = min(1000, max(1, rows // 1000))
    file = folder / "manifest.csv"
    with open(file, "w") as handle:
        handle.write("path,label\n")
        for i in range(rows):
            c = i % classes
            handle.write(f"images/{c:04d}/img_{i:08d}.jpg,class_{c:04d}\n")
    return file


def write_shards(folder: Path, members: int, per_shard: int = 1000) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    shards = -(-members // per_shard)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(members, (shard + 1) * per_shard)):
                for ext, content in (("jpg", jpeg), ("cls", str(i % 100).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def _child(data: str, per_class: str) -> dict:
    command = [sys.executable, __file__, "--child", data, per_class]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"plan of {data} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def measure(args: argparse.Namespace) -> dict:
    if args.child:
        return plan(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_manifest(folder, args.rows)
        (folder / "tars").mkdir()
        pattern = write_shards(folder / "tars", args.members)
        cases = {
            f"manifest ({args.rows:,} rows)": (str(manifest), ""),
            f"manifest subset train=230,test=26 of {args.rows:,}": (
                str(manifest),
                "train=230,test=26",
            ),
            f"tar shards ({args.members:,} samples)": (pattern, ""),
        }
        results = {}
        for name, (data, per_class) in cases.items():
            runs = [_child(data, per_class) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            extraction = best["images"] / args.rate
            best["estimated_extraction_s"] = extraction
            best["ratio"] = best["seconds"] / extraction
            best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            results[name] = best
    return {"rate_img_s": args.rate, "repeats": args.repeats, "cases": results}


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"planning ÷ extraction at {result['rate_img_s']:.0f} img/s")
    columns = ("plan", "images", "plan s", "read s", "hash s", "perm s", "shards s",
               "extraction s (est.)", "ratio", "peak RSS MB")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "plan" else "right")
    for name, r in result["cases"].items():
        phases = [f"{r['phases'][k]:.2f}" for k in ("read", "hash", "permutation", "shards")]
        table.add_row(
            name,
            f"{r['images']:,}",
            f"{r['seconds']:.2f}",
            *phases,
            f"{r['estimated_extraction_s']:.0f}",
            f"{r['ratio']:.4f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    Console(width=170).print(table)


if __name__ == "__main__":
    args = parse_args()
    if args.child:
        print(json.dumps(plan(*args.child)))
    else:
        _cli.run(lambda argv: args, measure, print_tables)
