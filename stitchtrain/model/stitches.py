"""Stitch layers: linear, MLP and LoRA maps from source layer-n tokens to target layer-n tokens.

A stitch S acts on a source token sequence ``(B, Ts, Ds)`` and returns a target-shaped one
``(B, Tt, Dt)`` (docs/design.md, "Token alignment between two encoders"):

    S(x) = map(align(x)) + offsets        offsets only on target prefix slots, see TokenAligner

  linear   map(t) = W t + b                                    per token, (Ds -> Dt)
  mlp      map(t) = W2 relu(W1 t + b1) + b2                    per token, hidden width H
  lora     S(x) = proj(align(f^n_{theta,LoRA}(x)))             x = source layer n-1 tokens
           (paper Table 3: source block n with LoRA, only the LoRA factors train)

The paper's MLP is "a two-layer perceptron with ReLU" without a hidden width; we default to
H = Dt, the LLaVA-1.5 projector convention the paper cites (override with ``mlp_hidden``).
Linear and MLP weights start from PyTorch's default init; ``init_identity`` / ``init_lstsq``
give the linear stitch a closed-form start.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from featcache.encoders.base import Encoder, TokenLayout

__all__ = ["STITCH_KINDS", "Stitch", "TokenAligner", "build_stitch", "stitched_outputs"]

STITCH_KINDS = ("linear", "mlp", "lora")
_LSTSQ_CHUNK_TOKENS = 1 << 16  # float64 rows per normal-equation update (bounds memory)


def _layout_str(layout: TokenLayout) -> str:
    return f"prefix={layout.prefix}, grid={layout.grid}"


def _check_tokens(tokens: Tensor, layout: TokenLayout, width: int | None, what: str) -> None:
    shape = tuple(tokens.shape)
    if len(shape) != 3 or shape[1] != layout.num_tokens or width not in (None, shape[2]):
        raise ValueError(
            f"Expected {what} of shape (B, {layout.num_tokens}, {width or 'D'}) for layout "
            f"{_layout_str(layout)}. Got {tuple(tokens.shape)} instead."
        )


def _resample_patches(patches: Tensor, source: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Bilinear resampling of a row-major patch grid: (B, Hs*Ws, D) -> (B, Ht*Wt, D)."""
    batch, _, width = patches.shape
    grid = patches.transpose(1, 2).reshape(batch, width, *source)  # (B, D, Hs, Ws)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)  # (B, D, Ht, Wt)
    return grid.flatten(2).transpose(1, 2)  # (B, Ht*Wt, D)


class TokenAligner(nn.Module):
    """Source token layout -> target token layout, applied before the per-token map.

    Patches ``(B, Hs*Ws, D)`` are resampled bilinearly (``align_corners=False``, pixel centres
    at ``(i + 0.5) * Hs / Ht - 0.5``, clamped at the border) to ``(B, Ht*Wt, D)``; matching
    grids pass through untouched. Prefix tokens:

    - same prefix layout: kept one to one (``prefix_shared`` is True);
    - otherwise every target prefix slot (CLS, each register) gets the source CLS token, or the
      mean source patch token when the source has no CLS; source prefix tokens with no target
      slot are dropped. The stitch then adds a learned offset per slot so the slots can differ;
    - target without prefix slots: none (e.g. a source CLS is dropped for SigLIP2).

    Channels are untouched: ``(B, Ts, D) -> (B, Tt, D)``. It has no parameters.
    """

    def __init__(self, source: TokenLayout, target: TokenLayout) -> None:
        super().__init__()
        self.source = source
        self.target = target
        self.prefix_shared = source.prefix == target.prefix
        self.resamples_grid = tuple(source.grid) != tuple(target.grid)

    def forward(self, tokens: Tensor) -> Tensor:
        _check_tokens(tokens, self.source, None, "source tokens")
        if self.prefix_shared and not self.resamples_grid:
            return tokens  # identical layouts: exactly the identity
        num_source_prefix = self.source.num_prefix_tokens
        source_prefix, patches = tokens[:, :num_source_prefix], tokens[:, num_source_prefix:]
        if self.resamples_grid:
            patches = _resample_patches(patches, self.source.grid, self.target.grid)
        if self.prefix_shared:
            prefix = source_prefix  # (B, P, D)
        elif self.target.num_prefix_tokens == 0:
            return patches  # no target slot (an empty prefix would export badly to ONNX)
        else:
            if self.source.has_cls:
                seed = source_prefix[:, self.source.prefix.index("cls")]  # (B, D)
            else:
                seed = tokens[:, num_source_prefix:].mean(dim=1)  # mean source patch, (B, D)
            prefix = seed[:, None].expand(-1, self.target.num_prefix_tokens, -1)  # (B, Pt, D)
        return torch.cat([prefix, patches], dim=1)  # (B, Tt, D)

    def extra_repr(self) -> str:
        return f"source=({_layout_str(self.source)}), target=({_layout_str(self.target)})"


class _LoRADelta(nn.Module):
    """Parametrization W -> W + (alpha / r) B A of a frozen weight W ``(out, in)``.

    Then ``y = W' x + b = W x + b + (alpha / r) B (A x)``: the LoRA update in merged form, which
    also reaches weights that library code reads directly (``nn.MultiheadAttention``'s
    ``in_proj_weight`` / ``out_proj.weight``, timm Eva's ``F.linear(x, self.qkv.weight)``).
    A ``(r, in)`` is kaiming-uniform, B ``(out, r)`` is zero, so W' equals W exactly at init.
    """

    def __init__(self, weight: Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as in the LoRA reference code
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)


def _lora_block(block: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Frozen deep copy of ``block`` with a LoRA delta on every linear weight inside it.

    Every ``nn.Linear`` weight gets one, and so does the fused input projection of each
    ``nn.MultiheadAttention`` (open_clip CLIP), the counterpart of timm's ``qkv`` Linear. The
    frozen tensors become non-persistent buffers: ``.to()`` moves them, while ``parameters()``
    and ``state_dict()`` hold only the LoRA factors (the copy is re-made from the source encoder).
    """
    block = copy.deepcopy(block).requires_grad_(False).eval()
    targets: list[tuple[nn.Module, str]] = []
    for module in block.modules():
        if isinstance(module, nn.Linear):
            targets.append((module, "weight"))
        elif isinstance(module, nn.MultiheadAttention):
            names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            targets += [(module, name) for name in names if getattr(module, name) is not None]
    for module, name in targets:
        delta = _LoRADelta(getattr(module, name), rank, alpha)
        parametrize.register_parametrization(module, name, delta)
    for module in block.modules():
        for name, tensor in list(module.named_parameters(recurse=False)):
            if not tensor.requires_grad:
                delattr(module, name)
                module.register_buffer(name, tensor.detach(), persistent=False)
        for name, tensor in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, tensor, persistent=False)
    return block


class Stitch(nn.Module):
    """S(x) = map(align(x)) + offsets, from source layer-n tokens to target layer-n tokens.

    Shapes: ``(B, Ts, Ds) -> (B, Tt, Dt)``; for ``kind == "lora"`` the input is source layer
    n-1 tokens, run through the LoRA copy of source block n (via ``Encoder.run_block``, which
    supplies RoPE and layout handling) before alignment. ``prefix_offsets`` ``(Pt, Dt)`` are
    learned per-slot vectors, zero at init, present only when the prefix layouts differ and
    the target has prefix slots (see ``TokenAligner``). Build with ``build_stitch``.

    ``parameters()`` and ``state_dict()`` hold only trainable tensors (linear / MLP weights,
    LoRA factors, projection, offsets). For "lora" the source encoder is referenced, not
    registered: it must sit on the stitch's device; the copied block stays in eval mode.
    """

    def __init__(
        self,
        kind: str,
        *,
        source: TokenLayout,
        target: TokenLayout,
        source_width: int,
        target_width: int,
        mapping: nn.Module,
        lora_block: nn.Module | None = None,
        source_encoder: Encoder | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__()
        assert kind in STITCH_KINDS and (kind == "lora") == (lora_block is not None)
        self.kind = kind
        self.source, self.target = source, target
        self.source_width, self.target_width = int(source_width), int(target_width)
        self.position = position
        self.block = lora_block
        self._source_encoder = [source_encoder] if source_encoder is not None else []
        self.align = TokenAligner(source, target)
        self.map = mapping
        num_slots = target.num_prefix_tokens
        offsets = torch.zeros(num_slots, self.target_width)
        has_offsets = not self.align.prefix_shared and num_slots > 0
        self.prefix_offsets = nn.Parameter(offsets) if has_offsets else None

    def forward(self, source_tokens: Tensor) -> Tensor:
        tokens = source_tokens  # (B, Ts, Ds)
        if self.block is not None:
            with parametrize.cached():  # each LoRA weight W' is formed once per forward
                tokens = self._source_encoder[0].run_block(self.position, tokens, block=self.block)
        tokens = self.map(self.align(tokens))  # (B, Tt, Dt)
        if self.prefix_offsets is not None:
            num_slots = self.prefix_offsets.shape[0]
            prefix = tokens[:, :num_slots] + self.prefix_offsets.to(tokens.dtype)  # (B, Pt, Dt)
            tokens = torch.cat([prefix, tokens[:, num_slots:]], dim=1)
        return tokens

    def train(self, mode: bool = True) -> Stitch:
        super().train(mode)
        if self.block is not None:
            self.block.eval()  # frozen source block: no dropout / drop-path
        return self

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- closed-form starts (linear only) ---------------------------------------------------
    def init_identity(self) -> None:
        """Self-stitch start: W = I, b = 0 (needs Ds == Dt and identical token layouts)."""
        if self.kind == "mlp":
            raise ValueError(
                "An identity is not representable by the 'mlp' stitch (its ReLU drops negative "
                "values); use kind='linear' for an identity self-stitch."
            )
        if self.kind != "linear":
            raise ValueError(
                f"init_identity applies to kind='linear'. Got kind={self.kind!r}; a 'lora' "
                "stitch already starts as source block n (its B factors are zero)."
            )
        if self.source_width != self.target_width or self.source != self.target:
            raise ValueError(
                "Expected equal widths and token layouts for an identity stitch. Got source "
                f"width {self.source_width} ({_layout_str(self.source)}) and target width "
                f"{self.target_width} ({_layout_str(self.target)}) instead."
            )
        with torch.no_grad():
            self.map.weight.copy_(torch.eye(self.target_width))
            self.map.bias.zero_()

    def init_lstsq(self, source: Tensor, target: Tensor, ridge: float = 0.0) -> None:
        """Least-squares start from source ``(N, Ts, Ds)`` and target ``(N, Tt, Dt)`` tokens."""
        self.init_lstsq_batches([(source, target)], ridge=ridge)

    def init_lstsq_batches(
        self, batches: Iterable[tuple[Tensor, Tensor]], ridge: float = 0.0
    ) -> None:
        """Closed-form linear stitch over all aligned tokens of all (source, target) batches.

        With X = align(source) as ``(N*Tt, Ds)`` rows and Y = target as ``(N*Tt, Dt)`` rows:

            min_{W,b} ||X W + 1 b - Y||^2 + ridge ||W||^2        (the bias b is not penalised)

        i.e. least squares on the design matrix [X 1]. Solved in float64 from sums accumulated
        chunk by chunk (memory O(Ds^2 + Ds Dt) for any N), in the equivalent centred form
        W = (Cxx + ridge I)^+ Cxy, b = mean_y - mean_x W, where Cxx = X^T X - n mx mx^T and
        Cxy = X^T Y - n mx my^T (^+: minimum-norm solve). Prefix offsets stay zero.
        """
        if self.kind != "linear":
            raise ValueError(f"init_lstsq fits kind='linear' only. Got kind={self.kind!r}.")
        if ridge < 0:
            raise ValueError(f"Expected ridge >= 0. Got {ridge} instead.")
        equations = _NormalEquations(self.source_width, self.target_width)
        step = max(1, _LSTSQ_CHUNK_TOKENS // self.target.num_tokens)  # images per chunk
        for source, target in batches:
            _check_tokens(source, self.source, self.source_width, "source tokens")
            _check_tokens(target, self.target, self.target_width, "target tokens")
            if source.shape[0] != target.shape[0]:
                raise ValueError(
                    f"Expected as many source as target images. Got {source.shape[0]} source "
                    f"and {target.shape[0]} target images instead."
                )
            with torch.no_grad(), torch.autocast(source.device.type, enabled=False):
                for start in range(0, source.shape[0], step):
                    x = self.align(source[start : start + step].double())  # (n, Tt, Ds)
                    equations.add(x, target[start : start + step].to(x))  # (n, Tt, Dt)
        weight, bias = equations.solve(ridge)
        with torch.no_grad():
            self.map.weight.copy_(weight.T)  # (Dt, Ds)
            self.map.bias.copy_(bias)


class _NormalEquations:
    """Running n, sum x, sum y, X^T X, X^T Y in float64 for a least-squares fit with bias."""

    def __init__(self, source_width: int, target_width: int) -> None:
        self.count = 0
        self.widths = (source_width, target_width)
        self.sums: list[Tensor] = []

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x.reshape(-1, self.widths[0]), y.reshape(-1, self.widths[1])  # (n, Ds), (n, Dt)
        parts = (x.sum(0), y.sum(0), x.T @ x, x.T @ y)
        if self.sums:
            self.sums = [total + part for total, part in zip(self.sums, parts, strict=True)]
        else:
            self.sums = list(parts)
        self.count += x.shape[0]

    def solve(self, ridge: float) -> tuple[Tensor, Tensor]:
        """(W ``(Ds, Dt)``, b ``(Dt,)``) on the CPU (where the minimum-norm driver lives)."""
        if self.count == 0:
            raise ValueError("Expected at least one (source, target) batch. Got none.")
        sum_x, sum_y, xtx, xty = (s.cpu() for s in self.sums)
        mean_x, mean_y = sum_x / self.count, sum_y / self.count
        cxx = xtx - self.count * torch.outer(mean_x, mean_x)
        cxx += ridge * torch.eye(self.widths[0], dtype=torch.float64)
        cxy = xty - self.count * torch.outer(mean_x, mean_y)
        weight = torch.linalg.lstsq(cxx, cxy, driver="gelsd").solution  # (Ds, Dt)
        return weight, mean_y - mean_x @ weight


def build_stitch(
    kind: str,
    *,
    source: TokenLayout,
    target: TokenLayout,
    source_width: int,
    target_width: int,
    mlp_hidden: int | None = None,
    source_encoder: Encoder | None = None,
    position: int | None = None,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
) -> Stitch:
    """A stitch of ``kind`` ("linear", "mlp" or "lora") from ``source`` to ``target`` tokens.

    - linear: ``nn.Linear(Ds, Dt)`` per token.
    - mlp: ``Linear(Ds, H) -> ReLU -> Linear(H, Dt)``, H = ``mlp_hidden`` or Dt.
    - lora: source block ``position`` = n (1..N) of ``source_encoder``, deep-copied and frozen,
      with rank-``lora_rank`` LoRA (alpha = ``lora_alpha`` or r) on its linear weights, fed
      source layer n-1 tokens; then alignment and, when Ds != Dt, a trainable
      ``nn.Linear(Ds, Dt)`` (the paper's pairs all have D = 1024 and need none).
    """
    if kind not in STITCH_KINDS:
        raise ValueError(f"Expected a stitch kind in {STITCH_KINDS}. Got {kind!r} instead.")
    sizes = {"source_width": source_width, "target_width": target_width, "mlp_hidden": mlp_hidden}
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"Expected {name} > 0 for a {kind!r} stitch. Got {value!r} instead.")
    lora_block = None
    if kind == "linear":
        mapping: nn.Module = nn.Linear(source_width, target_width)
    elif kind == "mlp":
        hidden = mlp_hidden or target_width
        mapping = nn.Sequential(
            nn.Linear(source_width, hidden), nn.ReLU(), nn.Linear(hidden, target_width)
        )
    else:
        _check_lora_args(source, source_width, source_encoder, position, lora_rank)
        alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        lora_block = _lora_block(source_encoder.block(position), lora_rank, alpha)
        same_width = source_width == target_width
        mapping = nn.Identity() if same_width else nn.Linear(source_width, target_width)
    stitch = Stitch(
        kind,
        source=source,
        target=target,
        source_width=source_width,
        target_width=target_width,
        mapping=mapping,
        lora_block=lora_block,
        source_encoder=source_encoder if kind == "lora" else None,
        position=position if kind == "lora" else None,
    )
    if lora_block is not None:
        stitch.to(next(lora_block.buffers()).device)  # where the source encoder lives
    return stitch


def _check_lora_args(
    source: TokenLayout, width: int, encoder: Encoder | None, position: object, rank: object
) -> None:
    if encoder is None:
        raise ValueError(
            "Expected source_encoder= for a 'lora' stitch (the model whose block n it adapts). "
            "Got None instead."
        )
    if type(position) is not int or not 1 <= position <= encoder.depth:
        raise ValueError(
            f"Expected position in 1..{encoder.depth} for a 'lora' stitch on {encoder.name} "
            f"(it adapts source block n, fed layer n-1). Got {position!r} instead."
        )
    if source != encoder.layout or width != encoder.width:
        raise ValueError(
            f"Expected the source layout and width of {encoder.name} for a 'lora' stitch "
            f"({_layout_str(encoder.layout)}, width {encoder.width}). "
            f"Got {_layout_str(source)}, width {width} instead."
        )
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Expected lora_rank >= 1. Got {rank!r} instead.")


def stitched_outputs(
    stitch: Stitch, target: Encoder, tokens: Tensor, position: int
) -> tuple[Tensor, Tensor]:
    """The stitched model past the source: target blocks n+1..N, final norm and pool on
    ``stitch(tokens)`` (source layer n tokens; layer n-1 for LoRA), as ``(final, pooled)``.
    The one forward that training, evaluation and the hybrid encoder run."""
    return target.run_from(stitch(tokens), position)
