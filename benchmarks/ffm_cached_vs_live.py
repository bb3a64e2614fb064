r"""FFM steps/s from the cache ÷ steps/s of a live FFM, against the ratio their FLOPs predict.

Goal (issue): measured speed-up ÷ predicted speed-up >= 0.9, i.e. training from cached
features is as much faster than running the encoders live as the skipped compute says it
should be: the loader and the bookkeeping add no time of their own.

One FFM step on a batch of B images (source layer n -> stitch -> target tail n+1..N):

  cached  batch from ``StitchRecipe._stage_loader("ffm", "train")`` (a staged ``FeatureLoader``
          over the stores: source ``layers/<n>``, target ``final``), then
          ``StitchRecipe._loss("ffm", batch)``, backward to the stitch, AdamW step
  live    the same images already decoded and preprocessed (one tensor per encoder, in memory,
          on the device), the same shuffled batches: ``source.run(x, upto=n)`` and
          ``target(x)`` (target final tokens) under ``no_grad``, then exactly the cached step
          on those tensors (same ``_loss``, backward, AdamW step)

Both run in one process with the same stitch, batch size, device and torch threads (bf16
autocast on CUDA, as ``StitchRecipe`` uses). The stores come from ``run_extraction`` over a
``make_demo_dataset`` dataset; the live encoders are the ones the recipe checks against the
stores' fingerprints. FLOPs of one step of each come from ``torch.utils.flop_counter``
(matmuls and attention, forward and backward; CPU flash attention is counted with torch's own
SDPA formulas): predicted speed-up = live FLOPs ÷ cached FLOPs. Both sides are warmed up, then
timed ``--repeats`` times alternately for ``--steps`` steps; other processes only ever add
time, so each side keeps its fastest repeat: measured speed-up = cached steps/s ÷ live
steps/s, and the headline is measured ÷ predicted. The median of the per-repeat (paired)
ratios is shown beside it. A separate, synchronised pass then splits a step of each side into
phases (data, encode, stitch + tail forward, backward, optimizer) with the GFLOP/s each
reaches, so a gap between measured and predicted shows where it comes from.

Default pair: ``timm:vit_small_patch14_dinov2`` (112 px, 8x8 patches + CLS) -> ``timm:
vit_small_patch16_dinov3`` (128 px, 8x8 patches + CLS + 4 registers, RoPE), both random-init
ViT-S (width 384) cut to 6 blocks, MLP stitch at layer 3.

    .venv/bin/python benchmarks/ffm_cached_vs_live.py                  # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/ffm_cached_vs_live.py --position 5 --json
    .venv/bin/python benchmarks/ffm_cached_vs_live.py --source dinov2-tiny --target clip-tiny \
        --source-img-size 0 --target-img-size 0 --depth 0 --position 2
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from featcache.demo_data import make_demo_dataset  # noqa: E402
from featcache.encoders import Encoder, load_encoder  # noqa: E402
from featcache.extract import ExtractConfig, plan_extraction, run_extraction  # noqa: E402
from featcache.images import decode_image  # noqa: E402
from stitchtrain.data.loader import FeatureLoader  # noqa: E402
from stitchtrain.pipeline.fit import StitchRecipe  # noqa: E402
from stitchtrain.train.config import FitConfig  # noqa: E402


def _as_raw(formula):
    """A registered (already shape-wrapped) formula, marked so the counter does not wrap it
    again."""

    def counted(*args, **kwargs):
        return formula(*args, **kwargs)

    counted._get_raw = True
    return counted


# torch's FLOP counter knows the CUDA attention kernels only; CPU SDPA dispatches to these.
_ATEN = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    getattr(_ATEN, name): _as_raw(formula)
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", sdpa_backward_flop),
    )
    if hasattr(_ATEN, name)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="timm:vit_small_patch14_dinov2")
    parser.add_argument("--target", default="timm:vit_small_patch16_dinov3")
    parser.add_argument(
        "--source-img-size", type=int, default=112, help="img_size override (timm:, 0: none)"
    )
    parser.add_argument(
        "--target-img-size", type=int, default=128, help="img_size override (timm:, 0: none)"
    )
    parser.add_argument(
        "--depth", type=int, default=6, help="blocks of both timm: encoders (0: the model's own)"
    )
    parser.add_argument("--position", type=int, default=3, help="stitch position n")
    parser.add_argument("--stitch", default="mlp", choices=("linear", "mlp"))
    parser.add_argument("--images", type=int, default=192, help="images in the dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per repeat and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both sides)"
    )
    parser.add_argument("--dtype", default="float16", help="store dtype")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def overrides(name: str, img_size: int, depth: int) -> dict:
    if not name.startswith("timm:"):
        return {}
    return {
        **({"img_size": img_size} if img_size else {}),
        **({"depth": depth} if depth else {}),
    }


def _no_mark(phase: str) -> None:
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


class Sides:
    """The cached and the live FFM step on one recipe, fed the same shuffled batches."""

    def __init__(self, recipe: StitchRecipe, source: Encoder, images: dict[str, torch.Tensor]):
        self.recipe = recipe
        self.source = source
        self.images = images  # "source" / "target": (num_images, 3, H, W), row i = store row i
        self.position = recipe.config.position
        self.loader: FeatureLoader = recipe._stage_loader("ffm", "train")
        self.optimizer = torch.optim.AdamW(recipe._trainable("ffm"), lr=recipe.config.lrs[0])
        self._cached = self._cached_batches()
        self._live = self._live_batches()

    # Both iterators run through epochs 0, 1, 2, ... of the same seeded permutations of the
    # train rows: the staged loader's epoch e and the live side's epoch e are the same batches.
    def _cached_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        while True:
            yield from self.loader.epoch(epoch)
            epoch += 1

    def live_rows(self) -> Iterator[torch.Tensor]:
        """Store rows of each live batch: the staged loader's seeded permutations."""
        device = self.images["source"].device
        rows = torch.from_numpy(self.loader.rows).to(device)
        n, size, epoch = len(rows), self.loader.batch_size, 0
        while True:
            order = np.random.default_rng([self.loader.seed, epoch]).permutation(n)
            order = torch.from_numpy(order).to(device)
            for start in range(0, n, size):
                yield rows[order[start : start + size]]
            epoch += 1

    def _live_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.live_rows():
            yield (
                self.images["source"].index_select(0, index),
                self.images["target"].index_select(0, index),
            )

    def same_batches(self) -> bool:
        """Whether the live rows of epochs 0 and 1 are the rows the cached loader yields."""
        loader = self.loader
        check = FeatureLoader(
            loader.fields, loader.rows, loader.batch_size, shuffle=True, seed=loader.seed,
            device=loader.device, return_rows=True,
        )  # fmt: skip
        cached = [b["rows"].cpu() for e in (0, 1) for b in check.epoch(e)]
        live = self.live_rows()
        return all(torch.equal(rows, next(live).cpu()) for rows in cached)

    def train_step(self, batch: dict[str, torch.Tensor], mark=_no_mark) -> float:
        """What ``StitchRecipe._train_epoch`` does per batch."""
        loss, _ = self.recipe._loss("ffm", batch)
        mark("forward")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        self.optimizer.step()
        value = float(loss.detach())
        mark("optimizer")
        return value

    def encode(self, source_images, target_images) -> dict[str, torch.Tensor]:
        """The live inputs of one step: source layer n and target final tokens."""
        with torch.no_grad(), self.recipe.autocast:
            source = self.source.run(source_images, upto=self.position)
            target, _ = self.recipe.target_encoder(target_images)
        return {"source": source.float(), "target": target.float()}

    def cached_step(self, mark=_no_mark) -> float:
        batch = next(self._cached)
        mark("data")
        return self.train_step(batch, mark)

    def live_step(self, mark=_no_mark) -> float:
        images = next(self._live)
        mark("data")
        batch = self.encode(*images)
        mark("encode")
        return self.train_step(batch, mark)


class Clock:
    """Seconds per phase of a step: ``mark(phase)`` ends that phase (device synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


def phase_split(sides: Sides, steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Mean seconds per phase of a step, per side (a separate, synchronised, untimed pass)."""
    split = {}
    for side, step in (("cached", sides.cached_step), ("live", sides.live_step)):
        clock = Clock(device)
        for _ in range(steps):
            step(clock)
        split[side] = {phase: seconds / steps for phase, seconds in clock.seconds.items()}
    return split


def timed(step: Callable[[], float], steps: int, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - started


def fixed_batch(sides: Sides) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The first B train rows: (cached batch read from the stores, source images, target
    images), without touching the two sides' batch iterators."""
    recipe = sides.recipe
    size = min(sides.loader.batch_size, len(recipe.train_rows))
    loader = FeatureLoader(
        recipe._fields("ffm"), recipe.train_rows[:size], size, shuffle=False,
        device=recipe.device, return_rows=True,
    )  # fmt: skip
    batch = next(iter(loader.epoch(0)))
    index = batch.pop("rows").to(sides.images["source"].device)
    return (
        batch,
        sides.images["source"].index_select(0, index),
        sides.images["target"].index_select(0, index),
    )


def flop_counts(sides: Sides) -> dict[str, int]:
    """FLOPs of one full-batch step of each side, of its parts, and of the stitch + tail
    forward and backward alone (one step each on a fixed batch)."""
    batch, source_images, target_images = fixed_batch(sides)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss, _ = sides.recipe._loss("ffm", batch)
    forward = int(counter.get_total_flops())
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss.backward()
    backward = int(counter.get_total_flops())
    sides.optimizer.zero_grad(set_to_none=True)
    cached = count_flops(lambda: sides.train_step(batch))
    with torch.no_grad(), sides.recipe.autocast:
        source_prefix = count_flops(lambda: sides.source.run(source_images, upto=sides.position))
        target_pass = count_flops(lambda: sides.recipe.target_encoder(target_images))
    live = count_flops(lambda: sides.train_step(sides.encode(source_images, target_images)))
    return {
        "batch": len(source_images),
        "cached": cached,
        "live": live,
        "live_source_prefix": source_prefix,
        "live_target_pass": target_pass,
        "forward": forward,
        "backward": backward,
    }


def loss_agreement(sides: Sides) -> float:
    """Relative difference of the cached and live loss on one batch, same stitch (no step)."""
    batch, source_images, target_images = fixed_batch(sides)
    with torch.no_grad():
        cached, _ = sides.recipe._loss("ffm", batch)
        live, _ = sides.recipe._loss("ffm", sides.encode(source_images, target_images))
    return abs(float(cached) - float(live)) / max(abs(float(live)), 1e-12)


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="stitchtrain-ffm-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    manifest = make_demo_dataset(
        scratch / "data", num_classes=4, per_class=math.ceil(args.images / 4), size=128,
        test_fraction=0.0,
    )  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = [
        load_encoder(name, random_init=True, device=device, **overrides(name, img_size, args.depth))
        for name, img_size in (
            (args.source, args.source_img_size),
            (args.target, args.target_img_size),
        )
    ]
    config = ExtractConfig(
        models=[e.name for e in encoders],
        data=str(manifest),
        out=str(scratch / "stores"),
        layers=[args.position],
        split="train",
        batch_size=args.batch_size,
        device=device.type,
        dtype=args.dtype,
        shard_size=64,
    )
    plan = plan_extraction(config, encoders)
    started = time.perf_counter()
    run_extraction(plan)
    extract_s = time.perf_counter() - started

    recipe = StitchRecipe(
        FitConfig(
            source=plan.urls[0],
            target=plan.urls[1],
            position=args.position,
            out=str(scratch / "run"),
            stitch=args.stitch,
            objective="ffm",
            lrs=(1e-3,),
            batch_size=args.batch_size,
            device=device.type,
            random_init=True,
        )
    )
    source = encoders[0]
    images: dict[str, list[torch.Tensor]] = {"source": [], "target": []}
    for record in plan.records:  # store row order
        image = decode_image(record.path, name=record.id)
        images["source"].append(source.preprocess(image))
        images["target"].append(recipe.target_encoder.preprocess(image))
    stacked = {key: torch.stack(value).to(device) for key, value in images.items()}
    sides = Sides(recipe, source, stacked)
    started = time.perf_counter()
    sides.loader.stage()
    stage_s = time.perf_counter() - started
    agreement = loss_agreement(sides)
    same_batches = sides.same_batches()

    flops = flop_counts(sides)
    for _ in range(args.warmup):
        sides.cached_step()
        sides.live_step()
    load_before = os.getloadavg()
    wait_before = sides.loader.stats.wait_seconds
    cached_s, live_s = [], []
    for _ in range(args.repeats):
        cached_s.append(timed(sides.cached_step, args.steps, device))
        live_s.append(timed(sides.live_step, args.steps, device))
    wait_s = sides.loader.stats.wait_seconds - wait_before
    split = phase_split(sides, args.steps, device)
    if args.dir is None:
        shutil.rmtree(scratch)

    predicted = flops["live"] / flops["cached"]
    measured = min(live_s) / min(cached_s)
    paired = [live / cached / predicted for cached, live in zip(cached_s, live_s, strict=True)]
    n_train = len(recipe.train_rows)
    saved_per_epoch = n_train / args.batch_size * (min(live_s) - min(cached_s)) / args.steps
    break_even = extract_s / saved_per_epoch if saved_per_epoch > 0 else None
    tail_blocks = recipe.target_encoder.depth - args.position
    return {
        "benchmark": "ffm_cached_vs_live",
        "goal": "(cached steps/s ÷ live steps/s) ÷ (live FLOPs ÷ cached FLOPs) >= 0.9",
        "source": {
            "name": args.source,
            "overrides": overrides(args.source, args.source_img_size, args.depth),
            "depth": source.depth,
            "width": source.width,
            "tokens": source.num_tokens,
        },
        "target": {
            "name": args.target,
            "overrides": overrides(args.target, args.target_img_size, args.depth),
            "depth": recipe.target_encoder.depth,
            "width": recipe.target_encoder.width,
            "tokens": recipe.target_encoder.num_tokens,
            "tail_blocks": tail_blocks,
        },
        "position": args.position,
        "stitch": args.stitch,
        "store_dtype": args.dtype,
        "images": len(plan.records),
        "train_rows": n_train,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": str(device),
        "autocast": "bf16" if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
        "torch": torch.__version__,
        "flops_per_step": flops,
        "predicted_speedup": predicted,
        "cached_steps_per_s": args.steps / min(cached_s),
        "live_steps_per_s": args.steps / min(live_s),
        "measured_speedup": measured,
        "ratio": measured / predicted,
        "ratio_paired_median": statistics.median(paired),
        "ratio_per_repeat": paired,
        "cached_s": cached_s,
        "live_s": live_s,
        "cached_loader_wait_fraction": wait_s / sum(cached_s),
        "phase_seconds_per_step": split,
        "stage_s": stage_s,
        "extract_s": extract_s,
        "extraction_break_even_epochs": break_even,
        "loss_relative_difference": agreement,
        "same_batches_cached_vs_live": same_batches,
    }


def print_tables(result: dict) -> None:
    console = Console()
    source, target = result["source"], result["target"]
    console.print(
        f"[bold]{source['name']}[/] {source['overrides']} (depth {source['depth']}, width "
        f"{source['width']}, {source['tokens']} tokens) -> [bold]{target['name']}[/] "
        f"{target['overrides']} (depth {target['depth']}, width {target['width']}, "
        f"{target['tokens']} tokens), {result['stitch']} stitch at layer {result['position']} "
        f"({target['tail_blocks']} tail blocks), {result['store_dtype']} stores, "
        f"{result['train_rows']} train rows, batch {result['batch_size']}, {result['steps']} "
        f"steps x {result['repeats']} repeats, {result['threads']} torch threads on "
        f"{result['cpu_count']} cores, device {result['device']}, load average "
        f"{result['load_average_1min'][0]:.2f} -> {result['load_average_1min'][1]:.2f}"
    )
    flops = result["flops_per_step"]
    table = Table(title="FFM step: cached ÷ live (goal: measured ÷ predicted >= 0.9)")
    for column in ("side", "GFLOP/step", "steps/s", "samples/s", "achieved GFLOP/s"):
        table.add_column(column, justify="right")
    for side in ("cached", "live"):
        steps = result[f"{side}_steps_per_s"]
        table.add_row(
            side,
            f"{flops[side] / 1e9:.2f}",
            f"{steps:.3f}",
            f"{steps * result['batch_size']:.1f}",
            f"{flops[side] * steps / 1e9:.1f}",
        )
    console.print(table)
    ratios = Table(title="speed-ups")
    for column in ("predicted (FLOPs)", "measured", "measured ÷ predicted", "paired median"):
        ratios.add_column(column, justify="right")
    ratios.add_row(
        f"{result['predicted_speedup']:.3f}",
        f"{result['measured_speedup']:.3f}",
        f"{result['ratio']:.3f}",
        f"{result['ratio_paired_median']:.3f}",
    )
    console.print(ratios)
    split = Table(title="mean time per step by phase (separate synchronised pass)")
    for column in ("phase", "GFLOP", "cached ms", "live ms", "cached GFLOP/s", "live GFLOP/s"):
        split.add_column(column, justify="right")
    phase_flops = {
        "encode": flops["live_source_prefix"] + flops["live_target_pass"],
        "forward": flops["forward"],
        "backward": flops["backward"],
    }
    times = result["phase_seconds_per_step"]
    for phase in ("data", "encode", "forward", "backward", "optimizer"):
        count = phase_flops.get(phase, 0)
        cells = [phase, f"{count / 1e9:.2f}" if count else "-"]
        cells += [
            f"{times[side][phase] * 1e3:.1f}" if phase in times[side] else "-"
            for side in ("cached", "live")
        ]
        cells += [
            f"{count / times[side][phase] / 1e9:.1f}" if count and phase in times[side] else "-"
            for side in ("cached", "live")
        ]
        split.add_row(*cells)
    console.print(split)
    breakeven = result["extraction_break_even_epochs"]
    console.print(
        f"live FLOPs split: source prefix {flops['live_source_prefix'] / 1e9:.2f} G, target "
        f"pass {flops['live_target_pass'] / 1e9:.2f} G, stitch + tail "
        f"{(flops['live'] - flops['live_source_prefix'] - flops['live_target_pass']) / 1e9:.2f}"
        f" G. Loader wait {100 * result['cached_loader_wait_fraction']:.1f}% of the cached "
        f"time; staging {result['stage_s']:.2f} s; extraction {result['extract_s']:.1f} s"
        + (f" (pays off after {breakeven:.1f} epochs)" if breakeven else "")
        + f"; cached vs live loss differ by {result['loss_relative_difference']:.1e} (relative);"
        f" same batches: {result['same_batches_cached_vs_live']}."
    )


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
