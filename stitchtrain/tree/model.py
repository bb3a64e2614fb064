"""VFM Stitch Tree (paper section 6.2, Figure 7): shared early blocks, one tail per encoder.

A multi-encoder system (MoF-LLaVA, Cambrian-1) runs k encoders on every image. The tree runs the
first n blocks of one of them, the trunk, once, and hands layer-n tokens to every branch:

    images (B, 3, H, W), preprocessed for the trunk
      trunk blocks 1..n, once                                  layer n tokens   (B, T0, D0)
        |-- trunk blocks n+1..N0, final norm, pool         -> trunk    (final, pooled)
        |-- stitch_1 -> encoder_1 blocks n+1..N1, norm, pool -> branch 1 (final, pooled)
        `-- stitch_k -> ...                                  -> branch k (final, pooled)

Each branch's output equals the stitched model of its run dir (trunk blocks 1..n, the stitch,
the branch encoder's blocks n+1..N), and the trunk's output equals the trunk encoder's own
forward: the tree only removes the repeated work. ``forward`` returns
``{name: (final (B, T, D), pooled (B, D'))}`` with the trunk first, then the branches in order.

Readout layer R (``readout_layer``; CLI ``--readout-layer``). An MLLM does not read an encoder's
final output: LLaVA takes the penultimate layer (layer 23 of a 24-block ViT-L), and the paper's
costs (Table 13, section 6.2) count blocks up to that layer. With R < N the trunk runs blocks
1..R and every branch runs blocks n+1..R only (no final norm, no pool: nothing after block R
runs), and ``forward`` returns ``{name: layer-R tokens (B, T, D)}``: the raw output of block R,
all T tokens (prefix tokens first), what ``encoder.run(images, upto=R)`` gives for the trunk and
what the stitched model cut at layer R gives for a branch. The tree returns ``(final, pooled)``
pairs, bit-identical to a tree without a readout layer, only when R is every encoder's depth N
(``reads_final``); that is the default (``readout_layer=None``: each encoder's own N). An
explicit R must lie in n+1..N (N: the smallest depth among the encoders); it is recorded in
tree.json (``readout_layer``; a tree.json without the key reads layer N).

LoRA branches (paper Table 3) are supported: such a stitch consumes trunk layer n-1 and runs its
own LoRA copy of trunk block n. When a tree has one, the trunk runs blocks 1..n-1 once, the LoRA
branches read layer n-1, and trunk block n runs once for the trunk's own output and the other
branches. Every trunk block still runs exactly once per forward; each LoRA branch holds one
extra block (its adapted copy) and runs it, i.e. it specialises blocks n..N instead of n+1..N.

Saved form (``save`` / ``load``), never pickle::

    TREE_DIR/tree.json                     trunk and branch encoder specs + fingerprints, the
                                           position, the readout layer (null: each encoder's
                                           own depth), per branch the stitch kind and constructor
                                           arguments and its weight file, provenance (run dirs)
    TREE_DIR/stitch-<branch>.safetensors   one per branch: the stitch's state dict

Encoder weights are not copied: they are re-loaded from their spec (plus the user's weight files,
keyed by encoder name, as everywhere else) and every fingerprint is checked against tree.json.

Memory: with ``prune=True`` (the default of ``from_runs`` and ``load``) the branch encoders'
blocks 1..n are freed, since the tree never runs them, and with R < N their blocks R+1..N too;
such an encoder then only supports running blocks n+1..R. Patch embeddings and position
embeddings of the branches are kept (about 0.4% of a ViT-L). The trunk is never pruned (it is
the caller's encoder): its blocks R+1..N stay in memory, unused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from featcache.encoders import Encoder
from stitchtrain.data.names import encoder_label
from stitchtrain.model.stitches import build_stitch
from stitchtrain.train.rundir import read_json_object
from stitchtrain.tree.branch import TreeBranch, _run_blocks
from stitchtrain.tree.errors import TreeError
from stitchtrain.tree.runs import resolve_runs
from stitchtrain.tree.saved import (
    TREE_FILE,
    TREE_FORMAT,
    TREE_VERSION,
    _build_from_args,
    _describe_encoder,
    _load_recorded,
    _load_stitch_state,
    _stitch_files,
    check_tree_dir,
    stitch_args,
)

__all__ = ["VFMStitchTree", "check_readout_layer"]


def check_readout_layer(
    readout_layer: Any, position: int, depth: int | None = None, *, what: str = "a readout layer"
) -> int:
    """Refuse a readout layer R outside ``position + 1 .. depth`` (``depth`` None: no upper
    bound known yet) in one line naming the value and the range; return R."""
    upper = "N" if depth is None else str(depth)
    if (
        type(readout_layer) is not int
        or readout_layer <= position
        or (depth is not None and readout_layer > depth)
    ):
        raise TreeError(
            f"Expected {what} in {position + 1}..{upper} (above the stitch position {position}, "
            f"up to the encoders' depth {upper}). Got {readout_layer!r} instead."
        )
    return readout_layer


# -- the tree -------------------------------------------------------------------------------------
class VFMStitchTree(nn.Module):
    """Trunk blocks 1..n once, then the trunk's own tail and every branch (module docstring).

    Args:
        trunk: the encoder whose early blocks are shared; its preprocessing defines the input.
        position: n, the number of shared trunk blocks (1..N0).
        branches: stitched tails, each at ``position`` with a stitch from the trunk's layout.
        trunk_name: the trunk's output key (default ``trunk.name``).
        readout_layer: R, the layer every output is read at (n+1..N, N the smallest depth);
            None (the default) reads each encoder's final output (module docstring).
        prune: free the branch encoders' blocks 1..n (and R+1..N) now (modifies them in place).

    ``forward(images)`` takes ``(B, 3, H, W)`` at ``trunk.image_size`` and returns
    ``{name: (final, pooled)}`` for the trunk and each branch when ``reads_final``, else
    ``{name: layer-R tokens (B, T, D)}``. Only stitch parameters require gradients, so the tree
    drops into another model as a module whose stitches can be tuned.

    Attributes:
        readout_layer: R; when None was given, the common depth N (None only when the
            encoders' depths differ: each is then read at its own N).
        reads_final: True when every encoder is read at its depth N: outputs are
            ``(final, pooled)``; False: outputs are layer-R tokens.
    """

    def __init__(
        self,
        trunk: Encoder,
        position: int,
        branches: Sequence[TreeBranch],
        *,
        trunk_name: str | None = None,
        readout_layer: int | None = None,
        prune: bool = False,
    ) -> None:
        super().__init__()
        if type(position) is not int or not 1 <= position <= trunk.depth:
            raise TreeError(
                f"Expected a position in 1..{trunk.depth} for trunk {trunk.name}. "
                f"Got {position!r} instead."
            )
        self.trunk = trunk
        self.position = position
        self.trunk_name = trunk_name or trunk.name
        seen = {self.trunk_name}
        for branch in branches:
            self._check_branch(branch, seen)
            seen.add(branch.name)
        self.branches = nn.ModuleList(branches)
        depths = [trunk.depth, *(branch.encoder.depth for branch in branches)]
        if readout_layer is None:
            self.readout_layer = depths[0] if len(set(depths)) == 1 else None
        else:
            self.readout_layer = check_readout_layer(readout_layer, position, min(depths))
        self.reads_final = readout_layer is None or set(depths) == {readout_layer}
        if prune:
            self.prune_branches()

    def _check_branch(self, branch: TreeBranch, seen: set[str]) -> None:
        trunk, stitch = self.trunk, branch.stitch
        if branch.name in seen:
            raise TreeError(
                f"Two outputs named {branch.name!r}. Name the branches (CLI: --branch "
                "NAME=RUN_DIR) so that each output, the trunk's included, has its own name."
            )
        if branch.position != self.position:
            raise TreeError(
                f"Branch {branch.name!r} stitches at position {branch.position}; the tree's "
                f"position is {self.position}."
            )
        if stitch.source != trunk.layout or stitch.source_width != trunk.width:
            raise TreeError(
                f"Branch {branch.name!r}: its stitch takes prefix={stitch.source.prefix}, "
                f"grid={stitch.source.grid}, width {stitch.source_width}, but trunk {trunk.name} "
                f"gives prefix={trunk.layout.prefix}, grid={trunk.grid}, width {trunk.width}."
            )
        if branch.is_lora:
            adapted = stitch._source_encoder[0]
            if adapted.fingerprint != trunk.fingerprint or stitch.position != self.position:
                raise TreeError(
                    f"Branch {branch.name!r}: its LoRA stitch adapts block {stitch.position} of "
                    f"{adapted.name} (fingerprint {adapted.fingerprint}); the tree needs block "
                    f"{self.position} of trunk {trunk.name} (fingerprint {trunk.fingerprint})."
                )
            stitch._source_encoder = [trunk]  # same weights; run the block with the trunk's RoPE

    # -- structure ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Output keys in order: the trunk, then the branches."""
        return [self.trunk_name, *(branch.name for branch in self.branches)]

    @property
    def has_lora(self) -> bool:
        return any(branch.is_lora for branch in self.branches)

    @property
    def shared_blocks(self) -> int:
        """Trunk blocks whose output every branch reads: n, or n-1 with a LoRA branch."""
        return self.position - 1 if self.has_lora else self.position

    @property
    def _upto(self) -> int | None:
        """The layer the blocks run up to: R, or None where each encoder runs to its own N."""
        return None if self.reads_final else self.readout_layer

    def layers_read(self, encoder: Encoder) -> int:
        """The layer ``encoder`` (the trunk or a branch's) is read at: R, or its depth N."""
        return encoder.depth if self.reads_final else self.readout_layer

    def prune_branches(self) -> None:
        """Free every branch encoder's blocks 1..n and R+1..N (see ``TreeBranch.prune``)."""
        for branch in self.branches:
            branch.prune(self._upto)

    def blocks_per_forward(self) -> int:
        """Transformer blocks one forward runs: R0 + sum over branches of (R_b - n [+ 1 LoRA]),
        with R_b the readout layer R, or the encoder's depth N_b when ``reads_final``."""
        tails = sum(self.layers_read(b.encoder) - self.position + b.is_lora for b in self.branches)
        return self.layers_read(self.trunk) + tails

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> dict[str, tuple[Tensor, Tensor]] | dict[str, Tensor]:
        """``images (B, 3, H, W)`` at the trunk's size -> ``{name: (final, pooled)}``, or
        ``{name: layer-R tokens (B, T, D)}`` when not ``reads_final``."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != tuple(self.trunk.image_size):
            raise TreeError(
                f"Expected images of shape (B, 3, {self.trunk.image_size[0]}, "
                f"{self.trunk.image_size[1]}) preprocessed for trunk {self.trunk.name}. "
                f"Got {tuple(images.shape)} instead."
            )
        n = self.position
        shared = self.trunk.run(images, upto=self.shared_blocks)  # (B, T0, D0), layer n or n-1
        layer_n = self.trunk.run_block(n, shared) if self.has_lora else shared  # (B, T0, D0)
        upto = self._upto
        if upto is None:
            outputs = {self.trunk_name: self.trunk.run_from(layer_n, n)}
        else:
            outputs = {self.trunk_name: _run_blocks(self.trunk, layer_n, n, upto)}
        for branch in self.branches:
            outputs[branch.name] = branch(shared if branch.is_lora else layer_n, upto)
        return outputs

    # -- construction from run dirs -------------------------------------------------------------
    @classmethod
    def from_runs(
        cls,
        trunk: Encoder,
        position: int,
        runs: Sequence[str | Path | tuple[str, str | Path]],
        *,
        weights: Mapping[str, str] | None = None,
        random_init: bool = False,
        device: str | torch.device | None = None,
        trunk_name: str | None = None,
        readout_layer: int | None = None,
        prune: bool = True,
        allow_geometry_mismatch: bool = False,
    ) -> VFMStitchTree:
        """A tree from finished ``stitchtrain fit`` run dirs, one branch per run.

        ``runs`` items are a run dir or ``(name, run dir)``; a branch is named after its target
        encoder by default. Each run's source store must have been extracted with ``trunk``
        (same fingerprint) and the run must stitch at ``position``; each branch encoder is
        loaded from the run's target store spec (``weights[name]`` or ``random_init``) and
        checked against that store's fingerprint. Anything else is refused with a
        ``TreeError`` naming the run dir. ``readout_layer``: see the class (checked first).
        Each run's source and target stores must see the same pixels
        (``pairing.check_geometry``) unless ``allow_geometry_mismatch`` or the run was fit
        with it.
        """
        from stitchtrain.train.encoders import load_run_encoder

        if readout_layer is not None:  # refused before any run dir is read
            check_readout_layer(readout_layer, position, trunk.depth)
        resolved = resolve_runs(position, runs, allow_geometry_mismatch=allow_geometry_mismatch)
        for run in resolved:  # every run before the first branch encoder loads
            recorded = run.source.attrs["encoder"]
            if recorded["fingerprint"] != trunk.fingerprint:
                raise TreeError(
                    f"Run dir {run.run_dir} was trained on source features of {recorded['name']} "
                    f"with fingerprint {recorded['fingerprint']} ({run.source.url}), but trunk "
                    f"{trunk.name} has fingerprint {trunk.fingerprint}: a different encoder, "
                    "weights or preprocessing. Load the trunk the source store was extracted "
                    "with (same name, --weights, --random-init)."
                )

        weights = dict(weights or {})
        device = device if device is not None else _device_of(trunk)
        branches = []
        for run in resolved:
            name, run_dir, config = run.name, run.run_dir, run.config
            source, target = run.source, run.target
            target_name = target.attrs["encoder"]["name"]  # a hybrid's: stitched:DIR
            encoder = load_run_encoder(target, weights.get(target_name), random_init, device)
            stitch = build_stitch(
                config["stitch"],
                source=trunk.layout,
                target=encoder.layout,
                source_width=trunk.width,
                target_width=encoder.width,
                mlp_hidden=config.get("mlp_hidden"),
                source_encoder=trunk if config["stitch"] == "lora" else None,
                position=position,
                lora_rank=config.get("lora_rank", 8),
            )
            _load_stitch_state(stitch, run_dir / "stitch.safetensors", f"run dir {run_dir}")
            provenance = {
                "run_dir": str(run_dir),
                "source_store": source.url,
                "target_store": target.url,
            }
            branches.append(
                TreeBranch(
                    name or encoder_label(target.attrs["encoder"]),
                    encoder,
                    stitch.to(device),
                    position,
                    provenance=provenance,
                )
            )
        return cls(
            trunk,
            position,
            branches,
            trunk_name=trunk_name,
            readout_layer=readout_layer,
            prune=prune,
        )

    # -- saving and loading ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The content of tree.json (JSON-ready)."""
        files = _stitch_files([branch.name for branch in self.branches])
        return {
            "format": TREE_FORMAT,
            "version": TREE_VERSION,
            "position": self.position,
            "readout_layer": self.readout_layer,
            "trunk_name": self.trunk_name,
            "trunk": _describe_encoder(self.trunk),
            "branches": [
                {
                    "name": branch.name,
                    "encoder": _describe_encoder(branch.encoder),
                    "stitch": {"file": file, **stitch_args(branch.stitch)},
                    "provenance": branch.provenance,
                }
                for branch, file in zip(self.branches, files, strict=True)
            ],
        }

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write tree.json and one stitch safetensors file per branch; return the directory.

        tree.json is written last: a directory without it holds no tree.
        """
        directory = Path(directory)
        target = directory / TREE_FILE
        check_tree_dir(directory, overwrite=overwrite)
        directory.mkdir(parents=True, exist_ok=True)
        described = self.describe()
        for branch, entry in zip(self.branches, described["branches"], strict=True):
            state = {
                k: v.detach().contiguous().cpu() for k, v in branch.stitch.state_dict().items()
            }
            # not save_file: it writes mode 0600; these bytes follow the umask
            (directory / entry["stitch"]["file"]).write_bytes(safetensors_bytes(state))
        partial = directory / (TREE_FILE + ".partial")
        partial.write_text(json.dumps(described, indent=2))
        partial.replace(target)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        weights: Mapping[str, str] | None = None,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        prune: bool = True,
    ) -> VFMStitchTree:
        """Rebuild a saved tree: re-load every encoder from its spec and check its fingerprint.

        ``weights`` maps encoder names (as in tree.json) to safetensors files; ``random_init``
        loads seeded random weights (trees of random-init encoders).
        """
        directory = Path(directory)
        path = directory / TREE_FILE
        if not path.is_file():
            raise TreeError(f"No tree at {directory} (no {TREE_FILE}). Build one with tree build.")
        described = read_json_object(path, f"a {TREE_FORMAT} description", "Build the tree again.")
        if described.get("format") != TREE_FORMAT or described.get("version") != TREE_VERSION:
            raise TreeError(
                f"Expected {path} to be a {TREE_FORMAT} version {TREE_VERSION} file. Got format "
                f"{described.get('format')!r} version {described.get('version')!r} instead."
            )
        weights = dict(weights or {})
        position = int(described["position"])
        readout_layer = described.get("readout_layer")  # absent before readout layers: N
        where = f"tree {directory}"
        trunk = _load_recorded(described["trunk"], weights, random_init, device, f"{where}, trunk")
        branches = []
        for entry in described["branches"]:
            name = entry["name"]
            encoder = _load_recorded(
                entry["encoder"], weights, random_init, device, f"{where}, branch {name!r}"
            )
            stitch = _build_from_args(entry["stitch"], trunk, position)
            _load_stitch_state(stitch, directory / entry["stitch"]["file"], where)
            branches.append(
                TreeBranch(
                    name,
                    encoder,
                    stitch.to(device),
                    position,
                    provenance=entry.get("provenance"),
                )
            )
        depths = {trunk.depth, *(branch.encoder.depth for branch in branches)}
        if depths == {readout_layer}:
            readout_layer = None  # the final output, as recorded (also where position is N)
        return cls(
            trunk,
            position,
            branches,
            trunk_name=described.get("trunk_name"),
            readout_layer=readout_layer,
            prune=prune,
        )


# -- helpers ----------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
