"""The report folder: which folders ``report --out`` may write (``check_report_dir``) and how a
report replaces one whole (``replaced_whole``).

A report goes only to a new path, an empty folder, or an earlier report: a folder holding
``index.html`` and ``report.md`` and otherwise only the files a report writes (``*.png``,
``*.csv``, ``*.md``, ``*.html``). Any other folder (a dataset, a sweep dir, a home folder) is
refused before anything is read or written, naming what it holds.

The report is built in a temp folder beside ``out`` (``.<name>.report-<pid>.partial``); only
when every file is written does it take ``out``'s place: an earlier report is renamed aside,
the new one renamed in, the old one removed. A failure removes the temp folder and leaves
``out`` as it was, so ``out`` never holds a mix of two reports or half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from featcache.errors import FeatcacheError

__all__ = ["REPORT_FILES", "check_report_dir", "replaced_whole"]

REPORT_FILES = ("index.html", "report.md")  # the two pages every report holds
_REPORT_SUFFIXES = {".png", ".csv", ".md", ".html"}


def _foreign(out: Path) -> list[str]:
    """Entries of the existing folder ``out`` that show it is not a report (sorted)."""
    entries = sorted(os.listdir(out))
    if not entries:
        return []
    if not all((out / name).is_file() for name in REPORT_FILES):
        return entries
    return [
        name
        for name in entries
        if not (out / name).is_file() or Path(name).suffix not in _REPORT_SUFFIXES
    ]


def check_report_dir(out: str | Path) -> Path:
    """``out`` as a Path if a report may be written there (module docstring), else a
    ``FeatcacheError`` naming what ``out`` holds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(
            f"Expected the report folder {out} to be a folder (or a new path). Got a file "
            "instead; choose another --out."
        )
    foreign = _foreign(out) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FeatcacheError(
            f"Expected the report folder {out} to be new, empty or an earlier report "
            f"(index.html, report.md, its .png and .csv files). Got a folder holding {shown} "
            "instead; choose another --out."
        )
    return out


@contextlib.contextmanager
def replaced_whole(out: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out`` to build the report in; on success it replaces
    ``out`` whole (module docstring), on failure it is removed and ``out`` is untouched."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.report-{os.getpid()}.partial"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        yield building
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.report-{os.getpid()}.old"
    if out.exists():
        os.replace(out, old)
    os.replace(building, out)
    shutil.rmtree(old, ignore_errors=True)
