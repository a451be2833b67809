"""The report's blocks (analysis/sections.py) as report.md and index.html, through the Jinja2 templates in
analysis/templates/ (shipped with the package: pyproject's package-data).

Escaping: index.html is autoescaped (Jinja2's select_autoescape on *.html.j2); report.md escapes every
value with the `md` filter (&, <, > as entities: Markdown renderers pass raw HTML through, so a
`<script>` in a run name would run where report.md is shown — GitHub strips it, many viewers and
static-site generators do not) and table cells with `md_cell` (also `|`, which would split the cell,
and line breaks, which would end the row).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from analysis.blocks import Block
from analysis.findings import Report
from analysis.sections import UNRESOLVED_TEXT
from harness.tracking import redact_uri

TEMPLATES = Path(__file__).parent / "templates"


def md_text(s) -> str:
    """Text from runs (names, params, tags, errors) made inert in Markdown: &, < and > become entities."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_cell(s) -> str:
    """A Markdown table cell: md_text, with `|` escaped and line breaks as spaces."""
    return md_text(s).replace("|", "\\|").replace("\n", " ")


def cell_class(value, col: int, warn_col: int | None) -> str:
    """The CSS class of a table cell in the column a table marks: a warning (⚠ …, "did not hold") or
    neutral (neither held nor refuted), else none."""
    if warn_col is None or col != warn_col:
        return ""
    v = str(value)
    if v.startswith("⚠") or v == "did not hold":
        return "warn"
    return "unresolved" if v == UNRESOLVED_TEXT else ""


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True,
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False))
    env.filters["md"] = md_text
    env.filters["md_cell"] = md_cell
    env.globals["cell_class"] = cell_class
    return env


_ENV = _environment()


def render(rep: Report, blocks: list[Block], template: str, now: str | None = None) -> str:
    """`template` ("report.md.j2" or "index.html.j2") filled with the report's header and blocks."""
    now = now or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return _ENV.get_template(template).render(study=rep.study, uri=redact_uri(rep.uri), parent_run_id=rep.parent_run_id,
                                              n_trials=len(rep.trials), now=now, blocks=blocks)
