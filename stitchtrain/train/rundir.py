"""The run dir's files: config.json (written, or compared on resume), history.csv, a finished
run's metrics.json, the checkpoint's file names, atomic writes (``write_file``), and the rules by
which fit trusts what it reads back from a run dir:

- fit removes only files it wrote, by their exact names (``remove_checkpoint``): checkpoint.json,
  ``checkpoint-<16 hex>.safetensors`` and their temp files ``<name>.fc-<pid>-<host>-<n>.partial``;
  when a fit starts or resumes, the temp files of any file it writes atomically (``WRITTEN``)
  whose writer is provably gone, by the store's rule (``remove_stale_temp_files``); any other
  file in the run dir (``checkpoint-notes.txt``, ``notes.txt.fc-1-0badf00d-0.partial``) is the
  user's and stays;
- a file a record names is a plain name of its exact pattern whose file lies in the run dir
  itself, not behind a symlink (``run_dir_file``);
- a record (checkpoint.json, stage-<stage>.json) carries ``digest``, the SHA-256 of the record
  without it as JSON with sorted keys and no spaces (``record_digest``), so an edited record is
  told from a written one; ``read_checkpoint`` checks checkpoint.json so for resume and for
  ``check_run_dir`` (``fit --dry-run``), which calls a run dir resumable only when resume
  would take its checkpoint;
- a JSON file that does not parse, nested too deeply for Python's parser included, is a
  ``ValueError`` (``read_json``) that each caller turns into its one-line refusal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import MISSING, asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.jsontext import parse_json
from featcache.store import TEMP_SUFFIX, remove_stale_partials, write_atomic
from stitchtrain.train.config import OBJECTIVES, FitConfig

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_TENSORS",
    "WRITTEN",
    "check_run_dir",
    "checkpoint_files",
    "config_changes",
    "finished_metrics",
    "read_checkpoint",
    "read_json",
    "read_json_object",
    "record_digest",
    "remove_checkpoint",
    "remove_stale_temp_files",
    "run_dir_file",
    "write_file",
]

CHECKPOINT = "checkpoint.json"
CHECKPOINT_TENSORS = r"checkpoint-[0-9a-f]{16}\.safetensors"  # named by its SHA-256's first 16 hex
# the files fit writes atomically (write_file) into a run dir, by exact name
_STAGE = rf"({'|'.join(s for s in OBJECTIVES if '+' not in s)})"
WRITTEN = re.compile(
    rf"metrics\.json|checkpoint\.json|{CHECKPOINT_TENSORS}|stage-{_STAGE}\.json"
    rf"|(stitch|stitch-{_STAGE}|head)\.safetensors"
)
# what remove_checkpoint deletes: the checkpoint files and the temp files of their atomic writes
_CHECKPOINT_FILES = re.compile(rf"(checkpoint\.json|{CHECKPOINT_TENSORS})({TEMP_SUFFIX})?")


def read_json(path: Path) -> Any:
    """The JSON value in ``path``. A file that is not JSON (bad UTF-8, bad syntax, or nested
    deeper than Python's parser recurses) raises ``ValueError``; ``OSError`` passes through."""
    return parse_json(path.read_bytes())


def record_digest(record: dict) -> str:
    """SHA-256 of ``record`` without its ``digest`` key, as JSON with sorted keys and the
    separators ``,`` and ``:``: what a checkpoint or stage record carries as ``digest``."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def run_dir_file(out: Path, name: Any, pattern: str, shape: str) -> Path:
    """``out / name`` when ``name`` is a plain file name matching the regex ``pattern`` (shown
    as ``shape``) and that file is not a symlink (it lies in ``out`` itself); else
    ``ValueError``. A name with a slash, ``..`` or an absolute path never matches."""
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise ValueError(f"Expected a file named {shape} inside {out}. Got {name!r} instead.")
    path = out / name
    if path.is_symlink():
        raise ValueError(
            f"Expected {name} to be a file inside {out}. Got a link to {path.resolve()} instead."
        )
    return path


def config_changes(saved: dict, config: FitConfig) -> list[str]:
    """The fields in which ``saved`` (a config as JSON) differs from ``config``; a field added
    since ``saved`` was written (allow_incomplete) counts as its default."""
    defaults = {f.name: f.default for f in dataclass_fields(FitConfig)}
    defaults = {k: v for k, v in defaults.items() if v is not MISSING}
    saved = {**json.loads(json.dumps(defaults)), **saved}
    current = json.loads(json.dumps(asdict(config)))
    return sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))


def read_json_object(path: Path, holds: str, advice: str) -> dict:
    """The JSON object in ``path``; anything else is a one-line ``FeatcacheError``: "Expected
    ``path`` to hold ``holds``. Got ... instead. ``advice``"."""
    try:
        value = read_json(path)
        got = None if isinstance(value, dict) else f"a JSON {type(value).__name__}"
    except (OSError, ValueError) as err:
        got = " ".join(f"{type(err).__name__}: {err}".split())
    if got is not None:
        raise FeatcacheError(f"Expected {path} to hold {holds}. Got {got} instead. {advice}")
    return value


def _write_or_check_config(out: Path, config: FitConfig) -> None:
    path = out / "config.json"
    if not _check_config(out, config):
        path.write_text(json.dumps(json.loads(json.dumps(asdict(config))), indent=2))


def _check_config(out: Path, config: FitConfig) -> bool:
    """Whether ``out`` has a config.json (refused when it is another config's, or not a
    config fit wrote)."""
    path = out / "config.json"
    if not path.exists():
        return False
    saved = read_json_object(
        path,
        "the JSON object of the config fit wrote",
        f"Use another --out, or remove {out} to start over.",
    )
    changed = config_changes(saved, config)
    if changed:
        raise FeatcacheError(
            f"Run dir {out} was started with a different config ({', '.join(changed)} "
            "differ). Use another --out, or the original options to resume."
        )
    return True


def _write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def finished_metrics(out: Path, config: FitConfig) -> dict | None:
    """metrics.json of a finished run dir, else None; a run dir of another config is refused."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    _write_or_check_config(out, config)
    metrics = read_json_object(
        path,
        "the JSON object of a finished run's metrics",
        "Remove it to run the fit again, or use another --out.",
    )
    remove_checkpoint(out)  # left by a kill between metrics.json and the cleanup
    return metrics


def remove_checkpoint(out: Path) -> None:
    """Delete the checkpoint files fit wrote in ``out`` (module docstring), by exact name:
    the JSON, tensors files, and the temp files a kill left of either."""
    for path in out.iterdir():
        if _CHECKPOINT_FILES.fullmatch(path.name) and not path.is_dir():
            path.unlink()


def checkpoint_files(out: Path) -> str:
    """What to remove to restart a run from scratch, in words."""
    return f"checkpoint.json and the checkpoint-<16 hex>.safetensors files in {out}"


def read_checkpoint(out: Path, config: FitConfig) -> tuple[dict, bytes]:
    """(record, tensors file bytes) of ``out``'s checkpoint.json, checked as
    ``stitchtrain.train.checkpoint``'s docstring says (digest, config, tensors file name and
    SHA-256); anything else is a one-line ``FeatcacheError`` saying why it cannot resume and
    what to remove."""
    path = out / CHECKPOINT
    try:
        record = read_json(path)
        if not isinstance(record, dict):
            raise ValueError(f"Expected a JSON object. Got a JSON {type(record).__name__} instead")
        if "digest" not in record:
            raise ValueError("it records no digest of its content (an older stitchtrain's?)")
        if record["digest"] != record_digest(record):
            raise ValueError("its content does not match the digest it records (edited?)")
        changed = config_changes(record["config"], config)
        tensors = record["tensors"]
        if not changed:
            shape = "checkpoint-<16 hex>.safetensors"
            name = run_dir_file(out, tensors["file"], CHECKPOINT_TENSORS, shape).name
            payload = (out / name).read_bytes()
            got = hashlib.sha256(payload).hexdigest()
            if got != tensors["sha256"]:
                raise ValueError(f"{name} has SHA-256 {got}, it names {tensors['sha256']}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = str(err) if type(err) is ValueError else f"{type(err).__name__}: {err}"
        raise FeatcacheError(
            f"Cannot resume from {path}: {' '.join(problem.split())}. Remove "
            f"{checkpoint_files(out)} to restart the run from scratch."
        ) from None
    if changed:
        raise FeatcacheError(
            f"Cannot resume from {path}: it was written under another config ({', '.join(changed)}"
            " differ from config.json and this command's: config.json was edited since). Use "
            f"another --out, or remove {checkpoint_files(out)} to restart the run from scratch."
        )
    return record, payload


def remove_stale_temp_files(out: Path) -> list[str]:
    """Delete the temp files of ``WRITTEN`` files in run dir ``out`` whose writer is provably
    gone (this host, no such process: ``featcache.store.remove_stale_partials``, the rule the
    store's writers use); a live writer's and every other file stay. Returns the removed
    paths."""
    return remove_stale_partials([str(out)], targets=WRITTEN.fullmatch)


def write_file(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically and durably: a temp file naming this writer, fsynced,
    renamed into place, then the run dir fsynced (``featcache.store.write_atomic(sync=True)``).
    A checkpoint's tensors file is so on disk, name included, before checkpoint.json names it,
    and checkpoint.json before training goes on. The file follows the umask."""
    write_atomic(str(path), [data], sync=True)


def check_run_dir(out: Path, config: FitConfig) -> str:
    """The state of run dir ``out`` for ``config``, writing nothing: "fresh" (no config.json
    yet), "resumable" (a checkpoint to continue from, validated as resume validates it:
    ``read_checkpoint``), "started" (config.json, no checkpoint: it starts over) or "finished"
    (metrics.json). A run dir of another config, or a checkpoint resume would refuse, is
    refused with resume's one-line reason."""
    if out.exists() and not out.is_dir():
        raise FeatcacheError(
            f"Expected --out to be a directory (or a new path). Got the file {out} instead."
        )
    if not (out / "config.json").is_file():
        return "fresh"
    _check_config(out, config)
    if (out / "metrics.json").is_file():
        return "finished"
    if not (out / CHECKPOINT).is_file():
        return "started"
    read_checkpoint(out, config)
    return "resumable"
