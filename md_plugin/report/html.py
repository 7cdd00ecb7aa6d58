"""A single self-contained ``report.html`` that shows the report's PNGs with reading guides.

Images are referenced by relative ``<img src>`` so the output folder can be zipped, copied or
served as-is. Every piece of text is HTML-escaped: class and layer names come from user data.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

__all__ = ["ReportFigure", "Section", "write_report_html"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; max-width: 70em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
"""


@dataclass
class ReportFigure:
    """A PNG in the report plus the caption that says how to read it."""

    path: str | Path
    caption: str = ""


@dataclass
class Section:
    """A heading with optional intro text, figures and tables (each a list of row dicts)."""

    heading: str
    text: str = ""
    figures: list[ReportFigure] = field(default_factory=list)
    tables: list[list[Mapping[str, object]]] = field(default_factory=list)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table_html(rows: Sequence[Mapping[str, object]]) -> str:
    """Columns are the union of the rows' keys in first-seen order; missing cells stay empty."""
    if not rows:
        return ""
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _img_src(path: str | Path, out_dir: Path) -> str:
    p = Path(path)
    if not p.is_absolute():
        p = out_dir / p
    rel = Path(os.path.relpath(p.resolve(), out_dir.resolve())).as_posix()
    return quote(rel)


def _as_section(s: Section | Mapping[str, object]) -> Section:
    """Accept plain dicts too, so callers need not import the dataclasses."""
    if isinstance(s, Section):
        return s
    figs = [f if isinstance(f, ReportFigure) else ReportFigure(**f) for f in s.get("figures", [])]
    return Section(
        heading=str(s["heading"]),
        text=str(s.get("text", "")),
        figures=figs,
        tables=list(s.get("tables", [])),
    )


def write_report_html(
    out_dir: str | Path, title: str, sections: Sequence[Section | Mapping[str, object]]
) -> Path:
    """Write ``out_dir/report.html``: title, then per section its text, tables and figures.

    Figure paths may be absolute or relative to ``out_dir``; they are written relative to
    it. Each image links to the full-size PNG, since large heatmaps are shrunk to page width.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for raw in sections:
        sec = _as_section(raw)
        parts.append(f"<section>\n<h2>{html.escape(sec.heading)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        parts.extend(_table_html(t) for t in sec.tables if t)
        for fig in sec.figures:
            src = _img_src(fig.path, out_dir)
            alt = html.escape(Path(fig.path).stem.replace("_", " "))
            parts.append(
                f'<figure>\n<a href="{src}"><img src="{src}" alt="{alt}"></a>\n'
                f"<figcaption>{html.escape(fig.caption)}</figcaption>\n</figure>"
            )
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
