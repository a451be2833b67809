"""The report's document: a flat list of blocks — headings, paragraphs, lists, tables, figures — that say
what the analysis found in words and formatted numbers, without markup. analysis/sections.py (and each
section's module: bracketing, extrapolation, posthoc_ema, loss_metric) build them; analysis/render.py
turns them into report.md and index.html through the templates in analysis/templates/, which escape
every text they are given (names of studies, trials and runs are the user's and may hold <, | or &).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Figure:
    """A figure the analysis drew: its file (beside index.html), title and caption."""
    file: str
    title: str
    caption: str


@dataclass(frozen=True)
class Block:
    """kind: "h2" | "h3" (text), "p" (text; warn: shown as a warning), "ul" (items), "table" (head, rows;
    warn_col: the column whose ⚠ / "did not hold" / "not resolved" cells are marked), "figure" (figure)."""
    kind: str
    text: str = ""
    warn: bool = False
    items: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    warn_col: int | None = None
    figure: Figure | None = None


def h2(text: str) -> Block:
    return Block("h2", text)


def h3(text: str) -> Block:
    return Block("h3", text)


def para(text: str, warn: bool = False) -> Block:
    return Block("p", text, warn=warn)


def ul(items) -> Block:
    return Block("ul", items=[str(x) for x in items])


def table(head: list[str], rows: list[list], warn_col: int | None = None) -> Block:
    return Block("table", head=list(head), rows=[[str(v) for v in r] for r in rows], warn_col=warn_col)


def figure(f: Figure) -> Block:
    return Block("figure", figure=f)
