"""Reading and checking a sweep config (TOML or YAML; its format: the package docstring)."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError

__all__ = ["dataset_label", "load_sweep_config"]

_GRID_KEYS = {"pairs", "both_directions", "positions", "objectives", "stitches", "seeds"}
_BASELINE_KEYS = {"probe", "self_stitch", "self_stitch_objectives"}
_TOP_KEYS = {"dataset", "stores", "grid", "fit", "baselines"}
# FitConfig fields the grid decides; every other field may be set in [fit]
_GRID_FIELDS = {"source", "target", "position", "out", "stitch", "objective", "seed"}
_GRID_FIELDS |= {"source_test", "target_test"}
_PROBE_FIELDS = ("lrs", "epochs", "patience", "val_fraction")
_FIT_ALIASES = {"lr": "lrs"}  # [fit] key spelled as fit's option -> the FitConfig field
_KEY = re.compile(r"^[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*$")


# -- config ---------------------------------------------------------------------------------------
def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml / .yml) sweep config into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"No sweep config at {path}.")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise FeatcacheError(f"{path} is not valid TOML: {err}") from err
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:  # pragma: no cover - pyyaml is present where tests run
            raise FeatcacheError("YAML sweep configs need pyyaml (pip install pyyaml).") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise FeatcacheError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise FeatcacheError(f"Expected a mapping at the top of {path}. Got {loaded!r}.")
        return loaded
    raise FeatcacheError(f"Expected a sweep config ending in .toml, .yaml or .yml. Got {path}.")


def _unknown(section: str, given, accepted) -> None:
    extra = sorted(set(given) - set(accepted))
    if extra:
        raise FeatcacheError(
            f"Unknown key(s) {extra} in sweep config [{section}]. Accepted: {sorted(accepted)}."
        )


def _fit_section(section: dict) -> dict[str, Any]:
    """[fit] with fit's option spellings accepted: ``lr`` (``fit --lr``) for the FitConfig field
    ``lrs``, one number or a list."""
    shared = dict(section)
    for alias, name in _FIT_ALIASES.items():
        if alias in shared:
            if name in shared:
                raise FeatcacheError(
                    f"Expected one of [fit] {alias} and {name} (one setting, two spellings). "
                    "Got both."
                )
            shared[name] = shared.pop(alias)
    if "lrs" in shared and not isinstance(shared["lrs"], (list, tuple)):
        shared["lrs"] = [shared["lrs"]]
    return shared


def _resolve(url: str, base: Path) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    return str((base / url).resolve())


def _one_store(pattern: str, base: Path, where: str) -> str:
    """A store path of the config, resolved against ``base``; a local glob (``*``, ``?``,
    ``[...]``, as fit's shell globs) must match exactly one path, which it becomes."""
    url = _resolve(pattern, base)
    if "://" in url or not glob.has_magic(url):
        return url
    matches = sorted(glob.glob(url))
    if not matches:
        raise FeatcacheError(
            f"Expected [stores] {where} to match one store. Got {pattern!r}, which matches no "
            f"store under {base} (featcache ls ROOT lists the stores)."
        )
    if len(matches) > 1:
        raise FeatcacheError(
            f"Expected [stores] {where} to match one store. Got {pattern!r}, which matches "
            f"{len(matches)}: {', '.join(matches)} (name one)."
        )
    return matches[0]


def _stores(config: dict, base: Path) -> dict[str, dict[str, str | None]]:
    stores = config.get("stores")
    if not isinstance(stores, dict) or not stores:
        raise FeatcacheError(
            "Expected a [stores] table naming each encoder's train store, e.g. "
            'dinov2 = "stores/train/dinov2.zarr". Got none.'
        )
    resolved = {}
    for key, value in stores.items():
        if not _KEY.match(key):
            raise FeatcacheError(
                f"Expected encoder keys of letters, digits, '_', '.' and single '-'. Got {key!r}."
            )
        if isinstance(value, str):
            value = {"train": value}
        if not isinstance(value, dict) or "train" not in value:
            raise FeatcacheError(
                f"Expected [stores] {key} = PATH or {{ train = PATH, test = PATH, weights = FILE "
                f"}}. Got {value!r}."
            )
        _unknown(f"stores.{key}", value, {"train", "test", "weights"})
        resolved[key] = {
            "train": _one_store(str(value["train"]), base, key),
            "test": _one_store(str(value["test"]), base, f"{key}.test")
            if value.get("test")
            else None,
            "weights": _resolve(str(value["weights"]), base) if value.get("weights") else None,
        }
    return resolved


def dataset_label(attrs: dict[str, Any]) -> str:
    """A short dataset name from a store's attrs: the folder of its manifest, or its name."""
    source = str(attrs["dataset"]["source"]).rstrip("/")
    path = Path(source)
    return path.parent.name if path.suffix in (".csv", ".json", ".jsonl") else path.name


def _as_list(value, name: str) -> list:
    if value is None:
        raise FeatcacheError(f"Expected [grid] {name} in the sweep config. Got none.")
    return list(value) if isinstance(value, (list, tuple)) else [value]
