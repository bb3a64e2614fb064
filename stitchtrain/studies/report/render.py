"""A report table (``Table``, Markdown and HTML) and the jinja2 environment of the report's
templates (package data: stitchtrain/studies/report/templates)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from markupsafe import Markup, escape

__all__ = ["Table"]


@dataclass
class Table:
    """A table rendered both as Markdown and as HTML; ``text_columns``: the indices of the
    columns besides the first holding text (left-aligned on the page, as the first column
    always is; the others are numbers, right-aligned)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    text_columns: tuple[int, ...] = ()

    def markdown(self) -> str:
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{self.title}**", "", line(self.header)]
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        lines += [line(row) for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def html(self) -> str:
        """The table as the report page shows it (templates/table.html.j2)."""
        return str(_templates().get_template("table.html.j2").module.table(self))


def _cell(value) -> Markup:
    """Escaped HTML of a cell; Markdown **bold** becomes <b>."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", str(escape(str(value)))))


@cache
def _templates():
    """The jinja2 environment of the report's templates (package data:
    stitchtrain/studies/report/templates)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("stitchtrain.studies.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["cell"] = _cell
    return environment
