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

The trunk encoder's own forward (the reference) is its run up to layer R. Two encoders of one
architecture read at R = 23 of 24 give 9/23 = 39% (VST-14) and 1/23 = 4.3% (VST-22) counted.

Precision: ``fp32``; ``bf16`` (weights cast to bfloat16, run under bf16 autocast, as MLLMs serve
encoders); ``amp-bf16`` (fp32 weights, bf16 autocast).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from featcache.encoders import Encoder, load_encoder
from featcache.errors import FeatcacheError
from featcache.extract import resolve_device
from stitchtrain.model.stitches import STITCH_KINDS, Stitch, build_stitch
from stitchtrain.tree.vst import (
    TreeBranch,
    VFMStitchTree,
    _free_blocks,
    additional_cost,
    check_readout_layer,
    stitch_args,
)

__all__ = ["BenchConfig", "FlopReport", "NaiveSystem", "PRECISIONS", "count_flops", "run_bench"]

PRECISIONS = ("fp32", "bf16", "amp-bf16")
_MIB = 2**20


@dataclass
class BenchConfig:
    """What ``stitchtrain tree bench`` measures; CLI options map onto these fields.

    Either ``tree`` (a saved tree dir: its trunk and branch encoders, its trained stitches at
    its own position) or ``encoders`` (two or more names, the first is the trunk; random
    stitches of kind ``stitch``). ``positions`` defaults to the tree's position.
    ``readout_layer`` (R, every system read at layer R; positions below it) defaults to the
    tree's, or N in ``encoders`` mode.
    """

    encoders: list[str] = field(default_factory=list)
    tree: str | None = None
    positions: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 3
    repeats: int = 10
    device: str = "auto"
    precision: str = "fp32"
    stitch: str = "mlp"
    weights: dict[str, str] = field(default_factory=dict)
    random_init: bool = False
    readout_layer: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.positions = tuple(int(n) for n in self.positions)
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        checks = [
            (bool(self.tree) != bool(self.encoders), "a TREE_DIR or --encoder names, not both"),
            (self.tree or len(self.encoders) >= 2, "at least two --encoder names (trunk first)"),
            (self.tree or self.positions, "--positions for --encoder mode, e.g. 6,14,22"),
            (self.batch_sizes and min(self.batch_sizes) >= 1, "--batch-sizes >= 1"),
            (self.warmup >= 0 and self.repeats >= 1, "--warmup >= 0 and --repeats >= 1"),
            (self.precision in PRECISIONS, f"--precision in {PRECISIONS}"),
            (self.stitch in STITCH_KINDS, f"--stitch in {STITCH_KINDS}"),
            (self.readout_layer is None or self.readout_layer >= 2, "--readout-layer >= 2"),
            (
                self.readout_layer is None or all(n < self.readout_layer for n in self.positions),
                f"--positions below --readout-layer {self.readout_layer} (a branch runs blocks "
                f"n+1..{self.readout_layer})",
            ),
        ]
        for ok, expected in checks:
            if not ok:
                raise FeatcacheError(f"Expected {expected}. Got {self._given()} instead.")

    def _given(self) -> str:
        return (
            f"tree={self.tree!r}, encoders={self.encoders}, positions={self.positions}, "
            f"batch_sizes={self.batch_sizes}, warmup={self.warmup}, repeats={self.repeats}, "
            f"precision={self.precision!r}, stitch={self.stitch!r}, "
            f"readout_layer={self.readout_layer!r}"
        )


# -- counting ------------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``scaled_dot_product_attention`` on (B, H, T, d): 2 B H T S d for QK^T, again for AV."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, **kw):
    """``nn.MultiheadAttention``'s inference fast path (open_clip CLIP), (B, T, D) batch-first:
    input projection 2 B T D (3D), attention 2 * 2 B T S D, output projection 2 B T D D."""
    batch, tokens, width = query_shape
    keys = key_shape[1]
    return (
        2 * batch * tokens * width * 3 * width
        + 4 * batch * tokens * keys * width
        + (2 * batch * tokens * width * width)
    )


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for ops ``FlopCounterMode`` misses: CPU attention (it only knows the CUDA
    kernels) and the MHA fast path. Counting ``scaled_dot_product_attention`` itself makes the
    count the same on every backend."""
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {
        aten.scaled_dot_product_attention: _sdpa_flops,
        aten._native_multi_head_attention: _native_mha_flops,
    }
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    return formulas


@dataclass
class FlopReport:
    """Counted forward FLOPs: ``total`` and per module, keyed by ``named_modules`` name."""

    total: int
    by_module: dict[str, int]

    def sum_of(self, names: Sequence[str]) -> int:
        return sum(self.by_module.get(name, 0) for name in names)


def count_flops(module: nn.Module, *args: Any) -> FlopReport:
    """Run ``module(*args)`` once under ``FlopCounterMode`` (inference mode) and report FLOPs.

    Per-module counts include their submodules; ``""`` is the module itself.
    """
    root = type(module).__name__
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with torch.inference_mode(), counter:
        module(*args)
    counts = counter.get_flop_counts()
    by_module = {}
    for name, _ in module.named_modules():
        key = f"{root}.{name}" if name else root
        by_module[name] = sum(counts.get(key, {}).values())
    return FlopReport(counter.get_total_flops(), by_module)


def _block_modules(system: nn.Module) -> list[nn.Module]:
    """Every transformer block a system holds: encoder blocks and LoRA stitches' block copies."""
    blocks: list[nn.Module] = []
    for module in system.modules():
        if isinstance(module, Encoder):
            blocks += [module.block(n) for n in range(1, module.depth + 1)]
        elif isinstance(module, Stitch) and module.block is not None:
            blocks.append(module.block)
    return blocks


def _names_of(system: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    wanted = {id(m) for m in modules}
    return [name for name, m in system.named_modules() if id(m) in wanted]


@contextlib.contextmanager
def _count_calls(modules: Sequence[nn.Module]):
    """Yield a one-item list that counts forward calls of ``modules`` inside the context."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# -- systems -------------------------------------------------------------------------------------
class _ReadAt(nn.Module):
    """One encoder of the naive system: its final output (``upto`` None) or its layer ``upto``.

    A module of its own so that the FLOP counter attributes the encoder's work to it even where
    ``Encoder.run`` (not the encoder's forward) runs the blocks."""

    def __init__(self, encoder: Encoder, upto: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.upto = upto

    def forward(self, images: Tensor) -> Any:
        if self.upto is None:
            return self.encoder(images)  # (final, pooled)
        return self.encoder.run(images, upto=self.upto)  # layer-R tokens (B, T, D)


class NaiveSystem(nn.Module):
    """Every encoder in full on its own input: ``{name: images (B, 3, H_i, W_i)}`` ->
    ``{name: (final, pooled)}``. The baseline a tree replaces (paper: "Naive", "Full").

    With ``readout_layer`` R below some encoder's depth, every encoder runs blocks 1..R and
    ``{name: layer-R tokens}`` is returned, as a ``VFMStitchTree`` with that readout layer does.
    """

    def __init__(
        self,
        names: Sequence[str],
        encoders: Sequence[Encoder],
        readout_layer: int | None = None,
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.reads_final = readout_layer is None or {e.depth for e in encoders} == {readout_layer}
        self.readout_layer = readout_layer
        upto = None if self.reads_final else readout_layer
        self.readers = nn.ModuleList(_ReadAt(encoder, upto) for encoder in encoders)

    @property
    def encoders(self) -> list[Encoder]:
        return [reader.encoder for reader in self.readers]

    def layers_read(self, encoder: Encoder) -> int:
        """The layer ``encoder`` is read at: R, or its depth N."""
        return encoder.depth if self.reads_final else self.readout_layer

    def forward(self, images: dict[str, Tensor]) -> dict[str, Any]:
        return {
            name: reader(images[name])
            for name, reader in zip(self.names, self.readers, strict=True)
        }


@dataclass
class _Template:
    """A system before it is copied to the device: its label, position and module (on the CPU)."""

    label: str
    position: int | None
    module: nn.Module


def _random_branches(
    trunk: Encoder,
    names: Sequence[str],
    encoders: Sequence[Encoder],
    position: int,
    args: Sequence[dict[str, Any]],
    seed: int,
) -> list[TreeBranch]:
    """Branches at ``position`` with seeded random stitches of the given kinds."""
    torch.manual_seed(seed)
    branches = []
    for name, encoder, stitch in zip(names, encoders, args, strict=True):
        lora = stitch["kind"] == "lora"
        built = build_stitch(
            stitch["kind"],
            source=trunk.layout,
            target=encoder.layout,
            source_width=trunk.width,
            target_width=encoder.width,
            mlp_hidden=stitch.get("mlp_hidden"),
            source_encoder=trunk if lora else None,
            position=position,
            lora_rank=stitch.get("lora_rank") or 8,
            lora_alpha=stitch.get("lora_alpha"),
        )
        branches.append(TreeBranch(name, encoder, built, position))
    return branches


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


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


def _inputs(system: nn.Module, batch: int, device, dtype) -> Any:
    """Random preprocessed images of the right size(s) for ``system``, on the device."""
    generator = torch.Generator().manual_seed(batch)

    def images(encoder: Encoder) -> Tensor:
        return torch.randn(batch, 3, *encoder.image_size, generator=generator).to(device, dtype)

    if isinstance(system, NaiveSystem):
        return {name: images(e) for name, e in zip(system.names, system.encoders, strict=True)}
    return images(system.trunk)


# -- measuring -----------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latency(run: Callable[[], Any], device, warmup: int, repeats: int) -> dict[str, float]:
    """One forward's wall time, ms: median and interquartile range by
    ``torch.utils.benchmark.Timer``.

    ``warmup`` untimed forwards, then ``Timer.timeit(number=1)`` (two more warm-up forwards
    and one timed) estimates one forward, t; ``blocked_autorange(min_run_time=repeats *
    max(t, 50 ms))`` then times blocks of forwards until that much time is spent. Timer makes
    a block long enough for its own overhead to vanish (10-100 ms): a forward of 50 ms or more
    is one block, so about ``repeats`` forwards are timed; faster forwards get ``repeats``
    blocks' worth of time, several blocks. Median and IQR are over the blocks, per forward.
    Timer runs at this process's torch thread count (its own default is 1 thread)."""
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        run()
    _synchronize(device)
    timer = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    estimate = timer.timeit(number=1).median
    measured = timer.blocked_autorange(min_run_time=repeats * max(estimate, 0.05))
    return {
        "latency_ms": measured.median * 1000,
        "latency_iqr_ms": measured.iqr * 1000,
        "latency_blocks": len(measured.times),
    }


def _rss_kib(field_name: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the next forward's
    allocations show up as RSS growth instead of reusing pages the allocator kept."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _held_bytes(system: nn.Module) -> int:
    """Bytes of every parameter and buffer the system holds (LoRA block copies included)."""
    tensors = {id(t): t for t in [*system.parameters(), *system.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _held_parameters(system: nn.Module) -> int:
    """Parameters in the paper's sense: trainable or frozen weights, LoRA block copies included
    (their frozen weights are buffers so that ``state_dict`` stays small)."""
    count = sum(p.numel() for p in system.parameters())
    for module in system.modules():
        if isinstance(module, Stitch) and module.block is not None:
            count += sum(b.numel() for b in module.block.buffers())
    return count


def _peak_memory_mb(run: Callable[[], Any], device, weights_mb: float) -> tuple[float, float]:
    """(peak MiB of one forward, activation MiB); see the module docstring for the method."""
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / _MIB, (peak - before) / _MIB
    if not _reset_peak_rss():
        return float("nan"), float("nan")
    before = _rss_kib("VmRSS")
    run()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return float("nan"), float("nan")
    activation = max(peak - before, 0) / 1024
    return weights_mb + activation, activation


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated (weights + inputs + activations), one system on device"
    return "cpu: parameter+buffer bytes + peak RSS growth during one forward (VmHWM, clear_refs)"


def _precision_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _on_device(template: _Template, precision: str, device: torch.device) -> nn.Module:
    """A private copy of the template on the device: a tree's branches pruned, and every
    encoder's blocks after the readout layer freed (no system runs them)."""
    system = copy.deepcopy(template.module)
    if isinstance(system, VFMStitchTree):
        system.prune_branches()
        unpruned = [system.trunk]
    else:
        unpruned = list(system.encoders)
    for encoder in unpruned:
        _free_blocks(encoder, range(system.layers_read(encoder) + 1, encoder.depth + 1))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return system.to(device=device, dtype=dtype).eval()


def _counted(system: nn.Module, template: _Template, device: torch.device) -> dict[str, Any]:
    """Parameters, weight bytes, FLOPs (total, in blocks, in stitches) and blocks run."""
    dtype = next(system.parameters()).dtype
    blocks = _block_modules(system)
    stitches = [m for m in system.modules() if isinstance(m, Stitch)]
    with _count_calls(blocks) as calls:
        flops = count_flops(system, _inputs(system, 1, device, dtype))
    result: dict[str, Any] = {
        "system": template.label,
        "position": template.position,
        "params_m": _held_parameters(system) / 1e6,
        "gflops": flops.total / 1e9,
        "weights_mb": _held_bytes(system) / _MIB,
        "blocks_run": calls[0],
        "block_gflops": flops.sum_of(_names_of(system, blocks)) / 1e9,
        "stitch_gflops": flops.sum_of(_names_of(system, stitches)) / 1e9,
    }
    if isinstance(system, NaiveSystem):  # the single-encoder reference of Table 13
        trunk = system.encoders[0]
        result["trunk_gflops"] = flops.sum_of(_names_of(system, [system.readers[0]])) / 1e9
        result["trunk_block_gflops"] = flops.sum_of(_names_of(system, _block_modules(trunk))) / 1e9
        result["trunk_blocks"] = system.layers_read(trunk)
    return result


def _timed(system: nn.Module, batch: int, config: BenchConfig, device, weights_mb: float):
    """Peak memory of one forward, then the latency (median, IQR), at one batch size."""
    inputs = _inputs(system, batch, device, next(system.parameters()).dtype)

    @torch.inference_mode()
    def run() -> Any:
        return system(inputs)

    memory, activation = _peak_memory_mb(run, device, weights_mb)
    latency = _latency(run, device, config.warmup, config.repeats)
    return {**latency, "memory_mb": memory, "activation_mb": activation}


def _measure(template: _Template, config: BenchConfig, device, log, done) -> dict[str, Any]:
    """Copy one system to the device, count, time and measure it (it is freed on return);
    ``done(step)`` after each batch size."""
    system = _on_device(template, config.precision, device)
    with _precision_context(device, config.precision):
        result = _counted(system, template, device)
        result["by_batch"] = {}
        for batch in config.batch_sizes:
            measured = _timed(system, batch, config, device, result["weights_mb"])
            result["by_batch"][str(batch)] = measured
            log(
                f"{template.label} batch {batch}: {measured['latency_ms']:.2f} ms (IQR "
                f"{measured['latency_iqr_ms']:.2f}), "
                f"{measured['memory_mb']:.1f} MiB ({result['gflops']:.2f} GFLOPs/image)"
            )
            done(f"{template.label} batch {batch}")
    return result


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
