"""Counting a system's forward FLOPs (``count_flops``, attention counted on every backend) and
the transformer blocks it runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from featcache.encoders import Encoder
from stitchtrain.model.stitches import Stitch

__all__ = ["FlopReport", "count_flops"]


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
    """Every transformer block a system holds, each once: encoder blocks and LoRA stitches'
    block copies. A hybrid (``stitched:``) holds its parents, whose blocks are its own; a
    LoRA hybrid's block n is its stitch, counted by the stitch's block copy."""
    blocks: dict[int, nn.Module] = {}
    for module in system.modules():
        if isinstance(module, Encoder):
            found = [module.block(n) for n in range(1, module.depth + 1)]
        elif isinstance(module, Stitch) and module.block is not None:
            found = [module.block]
        else:
            continue
        blocks.update((id(b), b) for b in found if not isinstance(b, Stitch))
    return list(blocks.values())


def _names_of(system: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    wanted = {id(m) for m in modules}
    return [name for name, m in system.named_modules() if id(m) in wanted]


@contextlib.contextmanager
def _called(modules: Sequence[nn.Module]):
    """Yield a set that holds, after the context, the ids of ``modules`` that ran."""
    ran: set[int] = set()
    handles = [m.register_forward_hook(lambda m, *_: ran.add(id(m))) for m in modules]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


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
