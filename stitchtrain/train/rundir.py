"""The run dir's files: config.json (written, or compared on resume), history.csv, a finished
run's metrics.json, the checkpoint's JSON name, and atomic writes (``write_file``)."""

from __future__ import annotations

import csv
import json
from dataclasses import MISSING, asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.store import write_atomic
from stitchtrain.train.config import FitConfig

__all__ = ["CHECKPOINT", "check_run_dir", "finished_metrics", "remove_checkpoint", "write_file"]

CHECKPOINT = "checkpoint.json"


def _write_or_check_config(out: Path, config: FitConfig) -> None:
    path = out / "config.json"
    if not _check_config(out, config):
        path.write_text(json.dumps(json.loads(json.dumps(asdict(config))), indent=2))


def _check_config(out: Path, config: FitConfig) -> bool:
    """Whether ``out`` has a config.json (refused when it is another config's)."""
    path = out / "config.json"
    current = json.loads(json.dumps(asdict(config)))
    if path.exists():
        # a field added since the run dir was made (allow_incomplete) counts as its default
        defaults = {f.name: f.default for f in dataclass_fields(FitConfig)}
        defaults = {k: v for k, v in defaults.items() if v is not MISSING}
        saved = {**json.loads(json.dumps(defaults)), **json.loads(path.read_text())}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise FeatcacheError(
                f"Run dir {out} was started with a different config ({', '.join(changed)} "
                "differ). Use another --out, or the original options to resume."
            )
        return True
    return False


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
    remove_checkpoint(out)  # left by a kill between metrics.json and the cleanup
    return json.loads(path.read_text())


def remove_checkpoint(out: Path) -> None:
    for path in out.glob("checkpoint*"):  # the JSON, tensors files, temp files of a kill
        path.unlink()


def write_file(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically and durably: a temp file naming this writer, fsynced,
    renamed into place, then the run dir fsynced (``featcache.store.write_atomic(sync=True)``).
    A checkpoint's tensors file is so on disk, name included, before checkpoint.json names it,
    and checkpoint.json before training goes on. The file follows the umask."""
    write_atomic(str(path), [data], sync=True)


def check_run_dir(out: Path, config: FitConfig) -> str:
    """The state of run dir ``out`` for ``config``, writing nothing: "fresh" (no config.json
    yet), "resumable" (a checkpoint to continue from), "started" (config.json, no checkpoint:
    it starts over) or "finished" (metrics.json). A run dir of another config is refused."""
    if out.exists() and not out.is_dir():
        raise FeatcacheError(
            f"Expected --out to be a directory (or a new path). Got the file {out} instead."
        )
    if not (out / "config.json").is_file():
        return "fresh"
    _check_config(out, config)
    if (out / "metrics.json").is_file():
        return "finished"
    return "resumable" if (out / CHECKPOINT).is_file() else "started"
