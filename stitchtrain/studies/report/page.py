"""Writing the report: ``build_report`` runs its steps (the sections) and writes report.md and
index.html."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stitchtrain.studies.report.folder import check_report_dir, replaced_whole
from stitchtrain.studies.report.models import MODELS_TITLE, models_section
from stitchtrain.studies.report.plots import PAGE_WIDTH_PX
from stitchtrain.studies.report.render import _templates
from stitchtrain.studies.report.runs import _DatasetRuns, load_results
from stitchtrain.studies.report.sections import (
    _across_section,
    _cka_section,
    _figures_section,
    _predictions_section,
    _runs_section,
    _Section,
    _tables_section,
)

__all__ = ["ProgressFn", "build_report"]


def _write(sections: list[_Section], out: Path, title: str) -> Path:
    """report.md (Markdown) and index.html (templates/report.html.j2) of ``sections``."""
    markdown = [f"# {title}", ""]
    for section in sections:
        markdown += [f"## {section.title}", ""]
        for kind, item in section.blocks:
            if kind == "figure":
                markdown += [f"![{item['png']}]({item['png']})", ""]
                markdown += [f"Plotted data: [{item['csv']}]({item['csv']})", ""]
            elif kind == "table":
                markdown += [item.markdown(), ""]
            else:
                markdown += [item, ""]
    (out / "report.md").write_text("\n".join(markdown))
    template = _templates().get_template("report.html.j2")
    page = template.render(title=title, sections=sections, width=PAGE_WIDTH_PX)
    (out / "index.html").write_text(page)
    return out / "index.html"


ProgressFn = Callable[[str, int, int], None]


def build_report(
    dirs: list[str | Path],
    out: str | Path,
    *,
    cka: bool = True,
    predictions: bool = True,
    cka_max_images: int | None = None,
    title: str = "Model stitching report",
    progress: ProgressFn | None = None,
) -> Path:
    """Write the report of the sweeps (and transfers) under ``dirs`` to ``out``; return
    the path of ``index.html``. ``cka`` reads the swept layers of the train stores;
    ``predictions`` recomputes test predictions of stitched and self-stitch runs (cached as
    ``predictions.npy`` in each run dir).

    ``progress(step, done, total)`` is called as each step starts, ``done`` of ``total``
    steps finished, and once at the end as ``("done", total, total)``. The steps, per
    dataset D: "figures D", "tables D", "CKA D" (with ``cka``), "predictions D" (with
    ``predictions``); then "tables across datasets", "models" and "runs table" (when there are
    sweep results) and "pages" (writing report.md and index.html).

    ``out`` must be new, empty or an earlier report (``folder.check_report_dir``); the report
    is built beside it and then replaces it whole (``folder.replaced_whole``)."""
    out = check_report_dir(out)
    frame, transfers = load_results(dirs)
    with replaced_whole(out) as building:
        _build(frame, transfers, building, cka, predictions, cka_max_images, title, progress)
    return out / "index.html"


def _build(frame, transfers, out: Path, cka, predictions, cka_max_images, title, progress):
    """``build_report``'s steps, writing into the folder ``out``."""
    steps: list[tuple[str, Callable[[], _Section | None]]] = []
    datasets = list(dict.fromkeys(frame.dataset)) if not frame.empty else []
    for dataset in datasets:
        runs = _DatasetRuns.of(frame, dataset)
        steps.append((f"figures {dataset}", lambda runs=runs: _figures_section(runs, out)))
        steps.append((f"tables {dataset}", lambda runs=runs: _tables_section(runs)))
        if cka:
            steps.append(
                (f"CKA {dataset}", lambda runs=runs: _cka_section(runs, out, cka_max_images))
            )
        if predictions:
            steps.append((f"predictions {dataset}", lambda runs=runs: _predictions_section(runs)))
    steps.append(("tables across datasets", lambda: _across_section(frame, transfers)))
    if not frame.empty:
        steps.append(("models", lambda: models_section(frame)))
        steps.append(("runs table", lambda: _runs_section(frame)))
    total = len(steps) + 1
    sections: list[_Section] = []
    for done, (step, make) in enumerate(steps):
        if progress is not None:
            progress(step, done, total)
        section = make()
        if section is not None:
            sections.append(section)
    if progress is not None:
        progress("pages", total - 1, total)
    # the Models section, what each sweep key stands for, heads the page
    _write(sorted(sections, key=lambda section: section.title != MODELS_TITLE), out, title)
    if progress is not None:
        progress("done", total, total)
