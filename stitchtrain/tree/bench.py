"""``stitchtrain tree bench``: what a VFM Stitch Tree saves over running every encoder in full.

For k encoders (the first is the trunk) it measures the naive system (each encoder on its own
input, in full) and VST-n for several positions n, one system at a time on the device.

Every system is read at the readout layer R (``readout_layer``, CLI ``--readout-layer``; default
N, each encoder's final output): with R < N the naive system runs each encoder's blocks 1..R and
a tree runs trunk blocks 1..R and branch blocks n+1..R (``VFMStitchTree``), nothing after block R
(no final norm, no pool). MLLMs read layer 23 of a 24-block ViT-L, the paper's L = 23.

  params_m     parameters the system holds, in millions (a LoRA branch's frozen copy of trunk
               block n included; pruned branch blocks 1..n and, in every system, blocks R+1..N
               excluded: the bench's copies free what the system never runs)
  gflops       counted forward FLOPs per image (``torch.utils.flop_counter`` at batch 1, with
               attention counted on every backend, see ``count_flops``); FLOPs = 2 x MACs, so
               fvcore-style "GFLOPs" (MACs) are half of these
  latency_ms   median wall time of one forward, per batch size, by
               ``torch.utils.benchmark.Timer`` (``torch.inference_mode``; the accelerator
               synchronised at each clock reading), after ``warmup`` untimed forwards, over
               about ``repeats`` timed ones (``_latency``); ``latency_iqr_ms`` its interquartile
               range, ``latency_blocks`` how many timed blocks both rest on
  memory_mb    peak memory of one forward, MiB. CUDA: ``torch.cuda.max_memory_allocated`` with
               only this system on the device (weights + inputs + activations). CPU: the exact
               bytes of the system's parameters and buffers plus the peak resident-set growth
               during the forward (Linux ``VmHWM`` after resetting it through
               ``/proc/self/clear_refs``; reported separately as ``activation_mb``)

That is the paper's Table 5 in our measurements. The additional-cost table (Table 13) compares,
for each system, the compute beyond one trunk encoder (read at layer R) with the formula
(k - 1)(L - n) / L, L = R:

  formula            (k - 1)(R - n) / R with R the readout layer (the trunk's depth N by
                     default); generalised to sum_b (R_b - n + [b is LoRA]) / R_0 when LoRA
                     branches exist, or depths differ and no readout layer is given (R_b = N_b)
  blocks_extra       transformer blocks counted by forward hooks, minus R_0, over R_0
  block_flops_extra  counted FLOPs inside transformer blocks beyond the trunk encoder's own,
                     relative to them: equals the formula when all encoders share one
                     architecture (the formula's assumption). A LoRA block copy also forms
                     W + (alpha / r) B A once per forward (2 r in out FLOPs per weight): that
                     lands here too, so LoRA trees sit slightly above the formula
  total_flops_extra  all counted FLOPs (embeddings, stitches, norms, pooling) relative to the
                     trunk encoder's full forward
  stitch_share       FLOPs inside the stitches relative to the trunk encoder's forward (a LoRA
                     stitch includes its block copy)
  stitches           the stitches the system runs: the tree's own and, for a hybrid
                     (``stitched:``) encoder, its inner stitch when its blocks run past it (the
                     naive system runs a hybrid whole, so its inner stitch too)
  stitch_params      their parameters (every tensor of each, a LoRA block copy included)
  stitch_gflops      their counted FLOPs per image: a linear stitch on T target tokens costs
                     2 T Ds Dt (an MLP 2 T (Ds H + H Dt)); token alignment resamples and
                     copies, counting none, and bias adds count none

The trunk encoder's own forward (the reference) is its run up to layer R. Two encoders of one
architecture read at R = 23 of 24 give 9/23 = 39% (VST-14) and 1/23 = 4.3% (VST-22) counted.

Precision: ``fp32``; ``bf16`` (weights cast to bfloat16, run under bf16 autocast, as MLLMs serve
encoders); ``amp-bf16`` (fp32 weights, bf16 autocast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from featcache.encoders import Encoder, load_encoder
from featcache.errors import FeatcacheError
from featcache.extract import resolve_device
from stitchtrain.tree.bench_config import BenchConfig
from stitchtrain.tree.cost import additional_cost
from stitchtrain.tree.measure import _measure, _memory_method, _release
from stitchtrain.tree.model import VFMStitchTree, check_readout_layer
from stitchtrain.tree.saved import stitch_args
from stitchtrain.tree.systems import NaiveSystem, _random_branches, _Template, _unique_names

__all__ = ["run_bench"]


def _load_systems(config: BenchConfig, log) -> tuple[list[str], list[Encoder], list[_Template]]:
    """(names, encoders, templates) with the trunk first; everything on the CPU."""
    readout = config.readout_layer
    if config.tree:
        log(f"loading tree {config.tree}")
        tree = VFMStitchTree.load(
            config.tree, weights=config.weights, random_init=config.random_init, prune=False
        )
        names = tree.names
        encoders = [tree.trunk, *(branch.encoder for branch in tree.branches)]
        kinds = [stitch_args(branch.stitch) for branch in tree.branches]
        positions = config.positions or (tree.position,)
        if readout is None and not tree.reads_final:
            readout = tree.readout_layer
    else:
        names = _unique_names(config.encoders)
        encoders = []
        for name in config.encoders:
            log(f"loading {name}")
            encoders.append(
                load_encoder(name, weights=config.weights.get(name), random_init=config.random_init)
            )
        kinds = [{"kind": config.stitch}] * (len(encoders) - 1)
        positions = config.positions
        tree = None
    for encoder in encoders:
        encoder.fingerprint  # noqa: B018  (hashed once here; the pruned copies inherit it)
    trunk = encoders[0]
    last = min(encoder.depth for encoder in encoders)
    for n in positions:
        if not 1 <= n <= last:
            raise FeatcacheError(
                f"Expected positions in 1..{last} (the smallest depth among "
                f"{', '.join(names)}). Got {n} instead."
            )
    if readout is not None:  # before anything is built: n < R <= the smallest depth
        what = "--readout-layer" if config.readout_layer is not None else "the tree's readout layer"
        check_readout_layer(readout, max(positions), last, what=what)
    templates = [_Template("naive", None, NaiveSystem(names, encoders, readout))]
    for n in positions:
        if tree is not None and n == tree.position:
            branches = list(tree.branches)  # the trained stitches
        else:
            branches = _random_branches(trunk, names[1:], encoders[1:], n, kinds, config.seed)
        module = VFMStitchTree(trunk, n, branches, trunk_name=names[0], readout_layer=readout)
        templates.append(_Template(f"VST-{n}", n, module))
    return names, encoders, templates


def _cost_rows(
    systems: list[dict[str, Any]], templates: list[_Template], read: Sequence[int]
) -> list[dict[str, Any]]:
    """The Table 13 comparison for every measured system (see the module docstring); ``read``
    holds the layer each encoder is read at (R, or its depth N), the trunk first."""
    naive = systems[0]
    k = len(read)
    rows = []
    for result, template in zip(systems, templates, strict=True):
        n = template.position or 0
        if isinstance(template.module, VFMStitchTree):
            lora = [b.is_lora for b in template.module.branches]
        else:
            lora = [False] * (k - 1)
        uniform = len(set(read)) == 1 and not any(lora)
        formula = (
            additional_cost(k, n, read[0])
            if uniform
            else sum(r - n + extra for r, extra in zip(read[1:], lora, strict=True)) / read[0]
        )
        row = {
            "system": result["system"],
            "position": template.position,
            "num_encoders": k,
            "blocks_run": result["blocks_run"],
            "formula": formula,
            "blocks_extra": (result["blocks_run"] - naive["trunk_blocks"]) / naive["trunk_blocks"],
            "block_flops_extra": result["block_gflops"] / naive["trunk_block_gflops"] - 1,
            "total_flops_extra": result["gflops"] / naive["trunk_gflops"] - 1,
            "stitch_share": result["stitch_gflops"] / naive["trunk_gflops"],
            "stitches": result["stitches"],
            "stitch_params": result["stitch_params"],
            "stitch_gflops": result["stitch_gflops"],
        }
        rows.append(row)
    return rows


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure the naive system and VST-n for each position; return a JSON-ready dict with
    ``systems`` (Table 5) and ``cost`` (Table 13) rows and how they were measured.
    ``progress(step, done, total)``: once the systems are loaded ("loaded", 0, total), then
    after each (system, batch size) measurement."""
    log = log or (lambda line: None)
    progress = progress or (lambda step, done, total: None)
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        names, encoders, templates = _load_systems(config, log)
        total, finished = len(templates) * len(config.batch_sizes), []
        progress("loaded", 0, total)

        def done(step: str) -> None:
            finished.append(step)
            progress(step, len(finished), total)

        systems = []
        for template in templates:
            systems.append(_measure(template, config, device, log, done))
            _release(device)
    naive = templates[0].module
    read = [naive.layers_read(encoder) for encoder in encoders]
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": config.precision,
        "batch_sizes": list(config.batch_sizes),
        "warmup": config.warmup,
        "repeats": config.repeats,
        "readout_layer": read[0] if len(set(read)) == 1 else None,
        "memory_method": _memory_method(device),
        "flops_method": "torch.utils.flop_counter at batch 1, FLOPs = 2 x MACs, attention counted",
        "encoders": [
            {
                "name": name,
                "role": "trunk" if index == 0 else "branch",
                "depth": encoder.depth,
                "width": encoder.width,
                "tokens": encoder.num_tokens,
                "image_size": list(encoder.image_size),
                "fingerprint": encoder.fingerprint,
            }
            for index, (name, encoder) in enumerate(zip(names, encoders, strict=True))
        ],
        "systems": systems,
        "cost": _cost_rows(systems, templates, read),
    }
