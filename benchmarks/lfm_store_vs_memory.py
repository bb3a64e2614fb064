r"""LFM samples/s fed from feature stores ÷ samples/s fed from the same tensors in memory.

Goal (issue): >= 0.9, i.e. the ``FeatureLoader`` keeps the LFM trainer busy: reading,
decoding (float16 -> float32), shuffling and batching cost (almost) nothing next to the step.

One LFM step on a batch of B rows, as ``stitchtrain fit --objective lfm`` runs it:
``StitchRecipe._loss("lfm", batch)`` (MSE of stitch(source layer n) against target layer n),
backward, AdamW step; the loss is read back every step as ``_train_epoch`` does. Three feeds,
same recipe code, same train rows, same batch size, device and torch threads:

  memory    the train rows of both arrays read beforehand into float32 tensors (on the device);
            each epoch a seeded permutation sliced with ``index_select``: exactly the batches
            of the staged loader (checked)
  staged    ``StitchRecipe._stage_loader("lfm", "train")``: a ``FeatureLoader`` that read the
            rows into memory once (its staging time is reported apart; ``fit`` reuses the
            loader for every epoch and learning rate)
  streamed  the same with ``--memory-budget`` (default 1 byte): a reader thread reads and
            decodes whole shards every epoch, shuffled per window of shards

The stores are written directly (``FeatureStore.create`` + ``write_shard``, as
``tests/test_fit.py`` does): a source layer of random float16 tokens and a target layer that
is a fixed linear map of it, shaped like a small ViT (``--grid`` x ``--grid`` patches + CLS,
``--width`` channels). They sit in the page cache (just written), as on a machine with RAM to
spare. For each torch thread count (``--threads``, default 1 and all cores; 1 is the CPU
analogue of a GPU run, where the step leaves the CPU cores to the loader), each feed is warmed
up for one epoch, then all three run ``--epochs`` epochs, ``--repeats`` times in turn; each
keeps its fastest repeat. ratio = memory seconds ÷ loader seconds (same samples); the median
of the per-repeat (paired) ratios is shown beside it. Loader GB/s is stored bytes read ÷
seconds spent reading and decoding (``LoaderStats.gb_per_s``); wait fraction = time waiting
for the next batch ÷ (waiting + step).

    .venv/bin/python benchmarks/lfm_store_vs_memory.py                 # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/lfm_store_vs_memory.py --stitch mlp --threads 2 --json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _synthetic import synthetic_dataset, synthetic_encoder  # noqa: E402

from featcache.store import FeatureStore, StoreSpec  # noqa: E402
from stitchtrain.data.loader import FeatureLoader, parse_size  # noqa: E402
from stitchtrain.pipeline.fit import StitchRecipe  # noqa: E402
from stitchtrain.train.config import FitConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="rows in the stores")
    parser.add_argument("--grid", type=int, default=8, help="patch grid side (plus one CLS)")
    parser.add_argument("--width", type=int, default=384, help="source channels")
    parser.add_argument("--target-width", type=int, default=384, help="target channels")
    parser.add_argument("--position", type=int, default=6, help="the stored layer n")
    parser.add_argument("--stitch", default="linear", choices=("linear", "mlp"))
    parser.add_argument("--batch-size", type=int, default=256, help="fit's LFM default")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--dtype", default="float16", help="store dtype")
    parser.add_argument("--compression", default="none", help="store compression")
    parser.add_argument(
        "--memory-budget", default="1", help="FeatureLoader budget of the streamed feed"
    )
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        default=",".join(str(t) for t in sorted({1, os.cpu_count() or 1})),
        help="torch thread counts to measure, comma-separated (default: 1 and all cores)",
    )
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- synthetic stores ----------------------------------------------------------------------------
def _spec(args: argparse.Namespace, name: str, width: int) -> StoreSpec:
    encoder = synthetic_encoder(name, depth=args.position + 1, width=width, grid=args.grid)
    dataset = synthetic_dataset(args.images)
    return StoreSpec(
        encoder=encoder,
        dataset=dataset,
        layers=(args.position,),
        dtype=args.dtype,
        compression=args.compression,
        shard_size=args.shard_size,
    )


def write_stores(args: argparse.Namespace, root: Path) -> tuple[str, str, float]:
    """(source url, target url, seconds): target layer n = source layer n @ W + b."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, args.width**-0.5, (args.width, args.target_width)).astype(np.float32)
    bias = rng.normal(0, 0.1, args.target_width).astype(np.float32)
    source = FeatureStore.create(str(root / "source.zarr"), _spec(args, "source", args.width))
    target = FeatureStore.create(
        str(root / "target.zarr"), _spec(args, "target", args.target_width)
    )
    tokens = 1 + args.grid * args.grid
    layer = f"layers/{args.position}"
    started = time.perf_counter()
    for shard in range(source.num_shards):
        start, stop = source.shard_rows(shard)
        rows = stop - start
        common = {
            "ids": np.array([f"image-{i:06d}" for i in range(start, stop)]),
            "labels": np.zeros(rows, np.int64),
            "valid": np.ones(rows, bool),
        }
        values = rng.standard_normal((rows, tokens, args.width), np.float32)
        mapped = values @ weight + bias
        info = {"rows": [start, stop], "skipped": []}
        # a store holds every array of its spec: final and pooled stand in as the layer itself
        for store, layer_values in ((source, values), (target, mapped)):
            features = {layer: layer_values, "final": layer_values, "pooled": layer_values[:, 0]}
            store.write_shard(shard, {**features, **common}, info)
    return source.url, target.url, time.perf_counter() - started


# -- the three feeds -----------------------------------------------------------------------------
class Feed:
    """Batches for one epoch plus the counters the tables need."""

    name = ""

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def counters(self) -> tuple[float, int, float]:
        """(wait seconds, bytes read, read seconds) so far."""
        raise NotImplementedError


class MemoryFeed(Feed):
    """The staged loader's batches, cut from tensors that were in memory before timing."""

    name = "memory"

    def __init__(self, loader: FeatureLoader, recipe: StitchRecipe):
        rows = loader.rows
        device = recipe.device
        self.tensors = {
            field.key: torch.from_numpy(field.store.read(field.array, rows)).to(device)
            for field in loader.fields
        }
        self.seed, self.batch_size, self.device = loader.seed, loader.batch_size, device
        self.wait = 0.0

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(next(iter(self.tensors.values())))
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        order = torch.from_numpy(order).to(self.device)
        for start in range(0, n, self.batch_size):
            began = time.perf_counter()
            index = order[start : start + self.batch_size]
            batch = {key: value.index_select(0, index) for key, value in self.tensors.items()}
            self.wait += time.perf_counter() - began
            yield batch

    def counters(self) -> tuple[float, int, float]:
        return self.wait, 0, 0.0


class LoaderFeed(Feed):
    def __init__(self, name: str, loader: FeatureLoader):
        self.name, self.loader = name, loader

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        return self.loader.epoch(epoch)

    def counters(self) -> tuple[float, int, float]:
        stats = self.loader.stats
        return stats.wait_seconds, stats.bytes_read, stats.read_seconds


def run_epochs(recipe, optimizer, feed: Feed, epochs: range) -> dict:
    """``StitchRecipe._train_epoch``'s loop (no validation) over ``epochs``; timings."""
    sync(recipe.device)
    wait0, bytes0, read0 = feed.counters()
    started = time.perf_counter()
    compute, samples = 0.0, 0
    for epoch in epochs:
        for batch in feed.epoch(epoch):
            step_start = time.perf_counter()
            loss, _ = recipe._loss("lfm", batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # _train_epoch reads the loss back every step
            compute += time.perf_counter() - step_start
            samples += len(batch["source"])
    sync(recipe.device)
    seconds = time.perf_counter() - started
    wait1, bytes1, read1 = feed.counters()
    return {
        "seconds": seconds,
        "samples": samples,
        "compute_s": compute,
        "wait_s": wait1 - wait0,
        "bytes_read": bytes1 - bytes0,
        "read_s": read1 - read0,
    }


def summarize(threads: int, runs: dict[str, list[dict]]) -> list[dict]:
    """One table row per feed: its fastest repeat, ratios against the memory feed."""
    best = {name: min(r, key=lambda run: run["seconds"]) for name, r in runs.items()}
    rows = []
    for name, run in best.items():
        paired = [
            m["seconds"] / r["seconds"] for m, r in zip(runs["memory"], runs[name], strict=True)
        ]
        rows.append(
            {
                "threads": threads,
                "feed": name,
                "samples_per_s": run["samples"] / run["seconds"],
                "ratio": best["memory"]["seconds"] / run["seconds"],
                "ratio_paired_median": statistics.median(paired),
                "wait_fraction": run["wait_s"] / (run["wait_s"] + run["compute_s"]),
                "loader_gb_per_s": run["bytes_read"] / run["read_s"] / 1e9
                if run["read_s"] > 0
                else None,
                "seconds_per_repeat": [r["seconds"] for r in runs[name]],
                **run,
            }
        )
    return rows


def measure(args: argparse.Namespace) -> dict:
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="stitchtrain-lfm-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    source_url, target_url, write_s = write_stores(args, scratch)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def recipe(budget: str | None) -> StitchRecipe:
        return StitchRecipe(
            FitConfig(
                source=source_url,
                target=target_url,
                position=args.position,
                out=str(scratch / "run"),
                stitch=args.stitch,
                objective="lfm",
                lrs=(1e-3,),
                batch_size=args.batch_size,
                device=device,
                memory_budget=budget,
            )
        )

    staged_recipe, streamed_recipe = recipe(None), recipe(args.memory_budget)
    staged = staged_recipe._stage_loader("lfm", "train")
    streamed = streamed_recipe._stage_loader("lfm", "train")
    if not staged.staged or streamed.staged:
        raise SystemExit(
            f"Expected a staged and a streamed loader; got staged={staged.staged} with the "
            f"default budget and staged={streamed.staged} with --memory-budget "
            f"{args.memory_budget} ({streamed.nbytes} bytes to stage)."
        )
    started = time.perf_counter()
    staged.stage()
    stage_s = time.perf_counter() - started
    stage_bytes = staged.stats.bytes_read
    memory = MemoryFeed(staged, staged_recipe)
    first_memory = next(memory.epoch(0))
    first_staged = next(iter(staged.epoch(0)))
    same_batches = all(torch.equal(first_memory[k], first_staged[k]) for k in first_memory)

    # every feed trains the same stitch (the staged recipe's); values do not change the cost
    optimizer = torch.optim.AdamW(staged_recipe._trainable("lfm"), lr=1e-3)
    feeds = [memory, LoaderFeed("staged", staged), LoaderFeed("streamed", streamed)]
    load_before = os.getloadavg()
    rows, epoch = [], 1  # epoch 0 was looked at above; every run gets new epoch numbers
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for feed in feeds:  # warm-up: one epoch each
            run_epochs(staged_recipe, optimizer, feed, range(epoch, epoch + 1))
        epoch += 1
        runs: dict[str, list[dict]] = {feed.name: [] for feed in feeds}
        for _ in range(args.repeats):
            for feed in feeds:
                epochs = range(epoch, epoch + args.epochs)
                runs[feed.name].append(run_epochs(staged_recipe, optimizer, feed, epochs))
            epoch += args.epochs
        rows += summarize(threads, runs)
    if args.dir is None:
        shutil.rmtree(scratch)
    n_train = len(staged.rows)
    tokens = 1 + args.grid * args.grid
    return {
        "benchmark": "lfm_store_vs_memory",
        "goal": "store-fed samples/s ÷ memory-fed samples/s >= 0.9",
        "images": args.images,
        "train_rows": n_train,
        "tokens": tokens,
        "width": args.width,
        "target_width": args.target_width,
        "stitch": args.stitch,
        "batch_size": args.batch_size,
        "steps_per_epoch": len(staged),
        "shard_size": args.shard_size,
        "store_dtype": args.dtype,
        "compression": args.compression,
        "streamed_memory_budget_bytes": parse_size(args.memory_budget),
        "staged_bytes_in_memory": staged.nbytes,
        "stored_bytes_per_epoch": stage_bytes,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "threads": [int(t) for t in args.threads.split(",")],
        "device": device,
        "autocast": "bf16" if device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
        "torch": torch.__version__,
        "write_s": write_s,
        "stage_s": stage_s,
        "stage_gb_per_s": stage_bytes / stage_s / 1e9,
        "same_batches_memory_vs_staged": same_batches,
        "rows": rows,
    }


def print_tables(result: dict) -> None:
    console = Console()
    console.print(
        f"{result['stitch']} stitch, {result['tokens']} tokens x {result['width']} -> "
        f"{result['target_width']} channels, {result['train_rows']} train rows "
        f"({result['steps_per_epoch']} steps of {result['batch_size']}), {result['store_dtype']} "
        f"stores, compression {result['compression']}, shards of {result['shard_size']}, "
        f"{result['stored_bytes_per_epoch'] / 1e6:.0f} MB stored per epoch, "
        f"{result['epochs']} epochs x {result['repeats']} repeats, torch threads "
        f"{result['threads']} on {result['cpu_count']} cores, device {result['device']}, load "
        f"average {result['load_average_1min'][0]:.2f} -> {result['load_average_1min'][1]:.2f}"
    )
    table = Table(title="LFM fed from stores ÷ fed from memory (goal >= 0.9)")
    columns = ("feed", "samples/s", "÷ memory", "paired median", "wait fraction", "loader GB/s")
    table.add_column("torch threads", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        gb = row["loader_gb_per_s"]
        table.add_row(
            str(row["threads"]),
            row["feed"],
            f"{row['samples_per_s']:.0f}",
            f"{row['ratio']:.3f}",
            f"{row['ratio_paired_median']:.3f}",
            f"{row['wait_fraction']:.3f}",
            "-" if gb is None else f"{gb:.3f}",
        )
    console.print(table)
    console.print(
        f"staging (once per fit, outside the timed epochs): {result['stage_s']:.2f} s, "
        f"{result['stage_gb_per_s']:.3f} GB/s; memory and staged batches identical: "
        f"{result['same_batches_memory_vs_staged']}."
    )


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
