"""Measuring one system of ``tree bench`` on the device: parameters, FLOPs and blocks run,
peak memory and latency (the method: ``stitchtrain.tree.bench``'s docstring)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stitchtrain.model.stitches import Stitch
from stitchtrain.tree.bench_config import BenchConfig
from stitchtrain.tree.branch import _free_blocks
from stitchtrain.tree.flops import (
    _block_modules,
    _called,
    _count_calls,
    _names_of,
    count_flops,
)
from stitchtrain.tree.model import VFMStitchTree
from stitchtrain.tree.systems import NaiveSystem, _inputs, _Template

_MIB = 2**20


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
    """(peak MiB of one forward, activation MiB); see ``stitchtrain.tree.bench``'s docstring for the
    method."""
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
    """Parameters, weight bytes, FLOPs (total, in blocks, in stitches) and blocks run; the
    stitches that ran (a tree's own and a hybrid encoder's inner stitch alike), their count and
    parameters (a LoRA stitch's block copy included)."""
    dtype = next(system.parameters()).dtype
    blocks = _block_modules(system)
    held = [m for m in system.modules() if isinstance(m, Stitch)]
    with _count_calls(blocks) as calls, _called(held) as ran:
        flops = count_flops(system, _inputs(system, 1, device, dtype))
    stitches = [stitch for stitch in held if id(stitch) in ran]
    result: dict[str, Any] = {
        "system": template.label,
        "position": template.position,
        "params_m": _held_parameters(system) / 1e6,
        "gflops": flops.total / 1e9,
        "weights_mb": _held_bytes(system) / _MIB,
        "blocks_run": calls[0],
        "block_gflops": flops.sum_of(_names_of(system, blocks)) / 1e9,
        "stitch_gflops": flops.sum_of(_names_of(system, stitches)) / 1e9,
        "stitches": len(stitches),
        "stitch_params": sum(_held_parameters(stitch) for stitch in stitches),
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
