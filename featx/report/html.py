"""Write the report as one self-contained HTML file (PNGs embedded as base64) and as Markdown linking the PNGs."""
from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Section:
    """A heading with, in order: paragraphs, bullet points, tables and figures (PNG path, caption)."""

    title: str
    level: int = 2
    paragraphs: list = field(default_factory=list)
    bullets: list = field(default_factory=list)
    tables: list = field(default_factory=list)  # DataFrames, already formatted as text
    figures: list = field(default_factory=list)  # (png path, caption)


_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?|–")
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; font-size: 16px;
       line-height: 1.5; color: #1d1d1f; max-width: 1200px; margin: 24px auto; padding: 0 24px; }
h1 { font-size: 28px; margin-bottom: 4px; } h2 { font-size: 22px; margin-top: 36px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 18px; margin-top: 24px; }
.meta { color: #555; font-size: 14px; }
.notes { background: #fff4d6; border-left: 5px solid #e0a800; padding: 10px 16px; margin: 16px 0; }
.notes p { margin: 4px 0; font-weight: 600; }
table { border-collapse: collapse; margin: 12px 0; font-size: 15px; }
th, td { padding: 5px 12px; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f3f3; }
.lead1 td:nth-child(-n+1), .lead1 th:nth-child(-n+1) { text-align: left; white-space: nowrap; }
.lead2 td:nth-child(-n+2), .lead2 th:nth-child(-n+2) { text-align: left; white-space: nowrap; }
.lead3 td:nth-child(-n+3), .lead3 th:nth-child(-n+3) { text-align: left; white-space: nowrap; }
.lead4 td:nth-child(-n+4), .lead4 th:nth-child(-n+4) { text-align: left; white-space: nowrap; }
.lead5 td:nth-child(-n+5), .lead5 th:nth-child(-n+5) { text-align: left; white-space: nowrap; }
.lead6 td:nth-child(-n+6), .lead6 th:nth-child(-n+6) { text-align: left; white-space: nowrap; }
.figs { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 22px; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 14px; color: #444; }
"""


def _numeric_columns(df):
    return [bool(df[c].map(lambda v: pd.isna(v) or bool(_NUMBER.fullmatch(str(v)))).all()) for c in df.columns]


def _leading_text(df):
    """How many columns at the left hold text (left-aligned); the numeric ones after them align right."""
    numeric = _numeric_columns(df) + [True]
    return min(numeric.index(True), 6)


def _img(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def write_html(path, title, sections, notes=(), meta_lines=()):
    """Write the report to `path`: title, meta lines, notes (highlighted, at the top), then the sections."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    parts += [f'<p class="meta">{e(line)}</p>' for line in meta_lines]
    if notes:
        parts.append('<div class="notes" id="notes">' + "".join(f"<p>{e(n)}</p>" for n in notes) + "</div>")
    for s in sections:
        parts.append(f"<h{s.level}>{e(s.title)}</h{s.level}>")
        parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if s.bullets:
            parts.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in s.bullets) + "</ul>")
        parts += [t.to_html(index=False, border=0, escape=True, na_rep="–", classes=f"lead{_leading_text(t)}")
                  for t in s.tables]
        if s.figures:
            parts.append('<div class="figs">')
            parts += [f'<figure><img src="{_img(p)}" alt="{e(c)}"><figcaption>{e(c)}</figcaption></figure>'
                      for p, c in s.figures]
            parts.append("</div>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


def md_text(text):
    """Text for Markdown: HTML special characters escaped, so a model name such as '<script>' stays text."""
    return html.escape(str(text), quote=False)


def markdown_table(df):
    """A GitHub pipe table of `df` (cells as text; '|' and HTML escaped; missing values as '–')."""
    def cell(v):
        return "–" if pd.isna(v) else md_text(v).replace("|", "\\|")

    numeric = _numeric_columns(df)
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_markdown(path, title, sections, notes=(), meta_lines=()):
    """Write the Markdown summary to `path`; figures are linked relative to the file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    e = md_text
    lines = [f"# {e(title)}", ""] + [f"{e(line)}  " for line in meta_lines]
    if notes:
        lines += [""] + [f"> **Note:** {e(n)}  " for n in notes]
    for s in sections:
        lines += ["", "#" * s.level + " " + e(s.title), ""]
        for p in s.paragraphs:
            lines += [e(p), ""]
        lines += [f"- {e(b)}" for b in s.bullets] + ([""] if s.bullets else [])
        for t in s.tables:
            lines += [markdown_table(t), ""]
        for p, c in s.figures:
            rel = os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/")
            lines += [f"![{e(c).replace(']', '&#93;')}]({rel})", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
