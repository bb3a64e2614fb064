"""``load_encoder``: the one door from a name to a frozen ``Encoder``.

Names:
  ``dinov2-l``, ``clip-tiny``, ...           a preset (``featcache models`` lists them)
  ``timm:<model>[.<tag>]``                    any timm VisionTransformer / Eva
  ``open_clip:<model>[@<tag>]``               any open_clip ViT or TimmModel visual tower
  ``<scheme>:<value>``                        a name scheme of ``ENCODER_SCHEMES``, e.g.
                                              ``stitched:RUN_OR_EXPORT_DIR`` (a hybrid VFM)

Name schemes: ``ENCODER_SCHEMES`` maps a scheme to the loader that resolves it, named by a
``"module:function"`` string and imported with importlib only when a name of that scheme is
loaded. featcache thereby never imports the package that implements a scheme (``stitched:``
lives in ``stitchtrain.hybrid``, above featcache): the loader is a plug-in found at run time,
like an entry point, and the layering contract (docs/design.md) holds for every import
statement; loading ``stitched:...`` needs stitchtrain installed, as the table says.

Weights, in order of precedence:
  ``weights=FILE``      a local safetensors state dict (timm model, or open_clip CLIP / visual)
  ``random_init=True``  seeded random weights (``seed``), for any model
  tiny presets          always seeded random weights
  otherwise             the pretrained tag from the hub; where the hub is unreachable the error
                        names the model and says how to supply weights
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from featcache import _compat  # noqa: F401
from featcache.encoders.base import Encoder
from featcache.encoders.presets import PRESETS, Preset
from featcache.errors import UnknownModelError, WeightsUnavailableError

__all__ = ["ENCODER_SCHEMES", "load_encoder", "resolve_spec", "describe_preset"]

# Name scheme -> "module:function" of its loader, called as load_encoder's own signature with
# the name's value after "<scheme>:" (module docstring: imported only when the scheme is used).
ENCODER_SCHEMES = {"stitched": "stitchtrain.hybrid.encoder:load_stitched"}


def _how_to_supply(name: str) -> str:
    """The hint after a missing-weights error, in each CLI's own syntax: ``--weights
    NAME=FILE`` (extract, tree), ``--source-weights`` / ``--target-weights FILE`` (fit)."""
    return (
        f"Pass weights=FILE (CLI: --weights {name}=FILE; stitchtrain fit: --source-weights / "
        "--target-weights FILE) with a local safetensors state dict of that model, or "
        "random_init=True (CLI: --random-init) for random weights."
    )


def _close_matches(word: str, candidates: list[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)


def resolve_spec(name: str) -> Preset:
    """Turn a user-facing name into a ``Preset`` (library, model, overrides); validate it.

    Raises ``UnknownModelError`` listing close matches when the name is unknown.
    """
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("timm:"):
        model = name.removeprefix("timm:")
        _check_timm_name(name, model)
        return Preset(name, "timm", model)
    if name.startswith("open_clip:"):
        model = name.removeprefix("open_clip:")
        _check_open_clip_name(name, model)
        return Preset(name, "open_clip", model)
    matches = _close_matches(name, list(PRESETS))
    hint = f" Close matches: {', '.join(matches)}." if matches else ""
    raise UnknownModelError(
        f"Expected a preset ({', '.join(PRESETS)}), 'timm:<model>', "
        f"'open_clip:<model>[@<tag>]' or 'stitched:<run or export dir>'. "
        f"Got {name!r} instead.{hint}"
    )


def _check_timm_name(name: str, model: str) -> None:
    import timm

    architecture = model.split(".")[0]
    if not timm.is_model(architecture):
        matches = _close_matches(architecture, timm.list_models())
        hint = f" Close matches: {', '.join('timm:' + m for m in matches)}." if matches else ""
        raise UnknownModelError(f"Unknown timm model {model!r} in {name!r}.{hint}")


def _check_open_clip_name(name: str, model: str) -> None:
    import open_clip

    architecture, _, tag = model.partition("@")
    if architecture not in open_clip.list_models():
        matches = _close_matches(architecture, open_clip.list_models())
        hint = f" Close matches: {', '.join('open_clip:' + m for m in matches)}." if matches else ""
        raise UnknownModelError(f"Unknown open_clip model {architecture!r} in {name!r}.{hint}")
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if tag and tag not in tags:
        raise UnknownModelError(
            f"Unknown pretrained tag {tag!r} for open_clip model {architecture!r}. "
            f"Expected one of: {', '.join(tags) or '(none)'}."
        )


def _check_weights_file(weights: str | os.PathLike) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"Weights file {str(path)!r} does not exist.")
    if path.suffix != ".safetensors":
        raise WeightsUnavailableError(
            f"Expected a .safetensors weights file. Got {str(path)!r} instead "
            "(pickled checkpoints are not loaded; convert with safetensors.torch.save_file)."
        )
    return path


def load_encoder(
    name: str,
    *,
    pretrained: bool | None = None,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Encoder:
    """Build a frozen, eval-mode ``Encoder`` from a preset or library name.

    Args:
        name: preset, ``timm:<model>``, ``open_clip:<model>[@<tag>]`` or a scheme of
            ``ENCODER_SCHEMES`` (``stitched:DIR``: a hybrid of a fit run or an export).
        pretrained: False refuses the hub (random or file weights only); None/True allow it.
        weights: local safetensors state dict to load.
        random_init: seeded random weights instead of pretrained ones.
        seed: seed for random weights (tiny presets and ``random_init``).
        device: where to put the module.
        overrides: architecture kwargs for the library (depth, embed_dim, num_heads, img_size,
            init_values, ...), and the geometry keys ``resize_mode`` / ``crop_pct`` (replacing
            the pretrained eval geometry; None keeps the model's own); they override the
            preset's and enter the fingerprint.
    """
    scheme, _, value = name.partition(":")
    if scheme in ENCODER_SCHEMES:
        return _scheme_loader(scheme)(
            value,
            pretrained=pretrained,
            weights=weights,
            random_init=random_init,
            seed=seed,
            device=device,
            **overrides,
        )
    preset = resolve_spec(name)
    arch = {**preset.overrides, **overrides}
    geometry = _geometry_overrides(arch)  # removed from arch: not architecture kwargs
    weights_path = _check_weights_file(weights) if weights is not None else None
    use_random = weights_path is None and (random_init or preset.tiny)
    if weights_path is None and not use_random and pretrained is False:
        raise WeightsUnavailableError(
            f"{name} needs weights and pretrained=False forbids the hub. {_how_to_supply(name)}"
        )
    spec = {"library": preset.library, "model": preset.model, "overrides": {**arch, **geometry}}
    with torch.random.fork_rng(devices=[]), _single_threaded(use_random):
        torch.manual_seed(seed)
        if preset.library == "timm":
            encoder = _load_timm(name, preset.model, arch, spec, weights_path, use_random)
        else:
            encoder = _load_open_clip(name, preset.model, arch, spec, weights_path, use_random)
        if preset.tiny and weights_path is None:
            _scale_tiny_init(encoder.module)
    if geometry:
        encoder.preprocessing = encoder.preprocessing.with_geometry(**geometry)
        encoder._fingerprint = None
    return encoder.to(device)


def _scheme_loader(scheme: str):
    """The loader function of name scheme ``scheme`` (``ENCODER_SCHEMES``), imported now."""
    module_name, _, function = ENCODER_SCHEMES[scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownModelError(
            f"Expected the package that loads '{scheme}:' names ({module_name}) to be "
            f"installed. Got {type(err).__name__}: {err} instead."
        ) from err
    return getattr(module, function)


def _geometry_overrides(arch: dict[str, Any]) -> dict[str, Any]:
    """Pop ``resize_mode`` / ``crop_pct`` from ``arch`` (None: the model's own); check them.

    They replace the model's pretrained eval geometry (input size and normalisation stay its
    own) and are recorded in ``spec["overrides"]``, so reloading a store's encoder from its
    spec (``load_encoder(name, **spec["overrides"])``) gives the same preprocessing.
    """
    from featcache.preprocess import GEOMETRY_KEYS, Preprocessing

    geometry = {key: arch.pop(key) for key in GEOMETRY_KEYS if key in arch}
    geometry = {key: value for key, value in geometry.items() if value is not None}
    if "crop_pct" in geometry:
        geometry["crop_pct"] = float(geometry["crop_pct"])
    probe = {"resize_mode": "squash", "crop_pct": 1.0, **geometry}
    Preprocessing((16, 16), probe["resize_mode"], probe["crop_pct"], "bicubic", (0,) * 3, (1,) * 3)
    return geometry


@contextlib.contextmanager
def _single_threaded(active: bool):
    """Run random init on one thread: multi-threaded ``erfinv_`` (timm's ``trunc_normal_``)
    gives last-bit differences between runs, so a seeded random model would not have a stable
    fingerprint across processes (seen: 2 runs in 12 differed in ``pos_embed``)."""
    if not active:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scale_tiny_init(module: torch.nn.Module) -> None:
    """Give toy models O(1) blocks: every Linear weight ~ N(0, 1/fan_in) (seeded by the caller).

    timm's ViT init (std 0.02) makes each block of a 96-wide toy model move the tokens by ~1%,
    so layers would be nearly interchangeable and tests comparing them would prove little.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)


# -- timm -------------------------------------------------------------------------------------
def _load_timm(name, model, arch, spec, weights_path, use_random) -> Encoder:
    import timm

    from featcache.encoders.timm_encoders import wrap_timm_model

    kwargs = dict(arch)
    kwargs.setdefault("num_classes", 0)
    try:
        if weights_path is not None:
            module = timm.create_model(
                model,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(weights_path)},
                **kwargs,
            )
        else:
            module = timm.create_model(model, pretrained=not use_random, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if weights_path is not None:
            raise WeightsUnavailableError(
                f"Could not load {str(weights_path)!r} into timm {model} for {name}: {err}"
            ) from err
        if not use_random:
            raise WeightsUnavailableError(
                f"No pretrained weights for {name} (timm {model}): the hub did not supply them "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). {_how_to_supply(name)}"
            ) from err
        raise
    return wrap_timm_model(module, name=name, spec=spec)


# -- open_clip --------------------------------------------------------------------------------
_OPEN_CLIP_ALIASES = {
    "depth": "layers",
    "embed_dim": "width",
    "img_size": "image_size",
    "init_values": "ls_init_value",
}


def _open_clip_vision_cfg(model: str, arch: dict[str, Any]) -> tuple[dict, int, bool, dict]:
    """(vision_cfg, output dim, quick_gelu, trunk overrides) with timm-style aliases mapped."""
    import open_clip

    architecture, _, tag = model.partition("@")
    config = copy.deepcopy(open_clip.get_model_config(architecture))
    vision_cfg = dict(config["vision_cfg"])
    output_dim = int(arch.get("output_dim", config["embed_dim"]))
    tag_cfg = open_clip.get_pretrained_cfg(architecture, tag) if tag else {}
    quick_gelu = bool(config.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    arch = {k: v for k, v in arch.items() if k != "output_dim"}
    trunk_overrides: dict[str, Any] = {}
    if vision_cfg.get("timm_model_name"):
        # open_clip's TimmModel passes no architecture kwargs to timm; they go to the trunk.
        trunk_overrides = {("img_size" if k == "image_size" else k): v for k, v in arch.items()}
        if "img_size" in trunk_overrides:
            vision_cfg["image_size"] = trunk_overrides["img_size"]
        return vision_cfg, output_dim, quick_gelu, trunk_overrides
    mapped = {_OPEN_CLIP_ALIASES.get(k, k): v for k, v in arch.items()}
    if "num_heads" in mapped:
        width = mapped.get("width", vision_cfg.get("width", 768))
        mapped["head_width"] = width // mapped.pop("num_heads")
    vision_cfg.update(mapped)
    return vision_cfg, output_dim, quick_gelu, trunk_overrides


def _timm_variant(model_name: str, trunk_overrides: dict[str, Any]) -> str:
    """Register (once) a timm entry point that is ``model_name`` with ``trunk_overrides``."""
    if not trunk_overrides:
        return model_name
    from timm.models import register_model
    from timm.models._registry import is_model, model_entrypoint

    key = hashlib.sha1(json.dumps(trunk_overrides, sort_keys=True).encode()).hexdigest()[:12]
    variant = f"featcache_{model_name}_{key}"
    if not is_model(variant):
        base = model_entrypoint(model_name)

        @functools.wraps(base)
        def entrypoint(pretrained: bool = False, **kwargs: Any):
            return base(pretrained=pretrained, **{**trunk_overrides, **kwargs})

        entrypoint.__name__ = entrypoint.__qualname__ = variant
        register_model(entrypoint)
    return variant


def _open_clip_preprocess_cfg(model: str) -> dict[str, Any]:
    import open_clip
    from open_clip.transform import PreprocessCfg

    architecture, _, tag = model.partition("@")
    merged = {**PreprocessCfg().__dict__}
    merged.update(open_clip.get_model_config(architecture).get("preprocess_cfg", {}))
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(architecture, tag)
        merged.update({k: v for k, v in tag_cfg.items() if k in merged})
    return merged


def _visual_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(path))
    if any(key.startswith("visual.") for key in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def _load_open_clip(name, model, arch, spec, weights_path, use_random) -> Encoder:
    import open_clip
    from open_clip.model import _build_vision_tower

    from featcache.encoders.open_clip_encoders import wrap_open_clip_visual
    from featcache.preprocess import Preprocessing

    architecture, _, tag = model.partition("@")
    vision_cfg, output_dim, quick_gelu, trunk_overrides = _open_clip_vision_cfg(model, arch)
    if vision_cfg.get("timm_model_name"):
        trunk_name = vision_cfg["timm_model_name"]
        vision_cfg["timm_model_name"] = _timm_variant(trunk_name, trunk_overrides)
    if use_random or weights_path is not None:
        visual = _build_vision_tower(output_dim, vision_cfg, quick_gelu=quick_gelu)
        if weights_path is not None:
            try:
                visual.load_state_dict(_visual_state_dict(weights_path), strict=True)
            except RuntimeError as err:
                raise WeightsUnavailableError(
                    f"Could not load {str(weights_path)!r} into open_clip {architecture} visual "
                    f"tower for {name}: {str(err).splitlines()[0]}"
                ) from err
    else:
        if not tag:
            raise WeightsUnavailableError(
                f"{name} names no pretrained tag; use open_clip:{architecture}@<tag> with one of "
                f"{open_clip.list_pretrained_tags_by_model(architecture)}. {_how_to_supply(name)}"
            )
        try:
            visual = open_clip.create_model(architecture, pretrained=tag).visual
        except Exception as err:  # open_clip raises many types for download failures
            raise WeightsUnavailableError(
                f"No pretrained weights for {name} (open_clip {architecture}@{tag}): the hub did "
                f"not supply them ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                f"{_how_to_supply(name)}"
            ) from err
    image_size = (
        tuple(visual.image_size)
        if not isinstance(visual.image_size, int)
        else (visual.image_size, visual.image_size)
    )
    preprocessing = Preprocessing.from_open_clip(_open_clip_preprocess_cfg(model), image_size)
    return wrap_open_clip_visual(visual, name=name, spec=spec, preprocessing=preprocessing)


def describe_preset(name: str) -> dict[str, Any]:
    """Architecture facts of a preset without weights: built on the meta device (no memory,
    no download), so ``featcache models`` can list ViT-L presets in a fraction of a second.

    ``preprocessing`` / ``geometry`` are what extraction uses by default (the presets' shared
    geometry); ``pretrained_preprocessing`` / ``pretrained_geometry`` the model's own eval
    transform from its library config."""
    from featcache.preprocess import Geometry

    preset = PRESETS[name]
    with torch.device("meta"):
        encoder = load_encoder(name, random_init=True, device="meta")
    own = encoder.pretrained_preprocessing
    return {
        "name": name,
        "model": f"{preset.library}:{preset.model}",
        "depth": encoder.depth,
        "width": encoder.width,
        "prefix": encoder.layout.prefix,
        "grid": encoder.grid,
        "image_size": encoder.image_size,
        "pooling": encoder.pooling,
        "preprocessing": encoder.preprocessing.to_dict(),
        "geometry": encoder.geometry.to_dict(),
        "pretrained_preprocessing": own.to_dict(),
        "pretrained_geometry": Geometry.from_preprocessing(
            own, encoder.grid, encoder.patch_size
        ).to_dict(),
        "weights": "random (seeded)" if preset.tiny else "hub or --weights",
        "about": preset.about,
    }
