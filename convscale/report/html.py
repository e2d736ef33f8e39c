"""The report as ONE self-contained HTML page: figures as base64 PNG data URIs, inline CSS, no
scripts, no external URLs (it opens offline and can be mailed as one file)."""

from __future__ import annotations

import base64
import html
import re
import struct
from pathlib import Path

from convscale.report.content import Figure, Section, Table
from convscale.report.plots import PNG_DPI

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; font-size: .82em; margin: .6em 0 1.2em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .25em .55em; text-align: right; white-space: nowrap; }
table.wrap td, table.wrap th { white-space: normal; text-align: left; min-width: 7em; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 1.6em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
code { background: #f6f6f6; padding: 0 .2em; }
"""


def _inline(text: str) -> str:
    """Escape, then the one Markdown feature the content uses: **bold**."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(str(text)))


def table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    cls = ' class="wrap"' if t.wrap else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(fig: Figure, report_dir: Path, dpi: int = PNG_DPI) -> str:
    raw = (report_dir / f"{fig.name}.png").read_bytes()
    # shown at the figure's size in inches (96 CSS px per inch), so every figure's fonts match
    width_px = round(struct.unpack(">I", raw[16:20])[0] * 96 / dpi)
    data = base64.b64encode(raw).decode("ascii")
    return (f'<figure id="fig-{html.escape(fig.name)}"><img alt="{html.escape(fig.name)}" style="width: {width_px}px" '
            f'src="data:image/png;base64,{data}"><figcaption>{_inline(fig.caption)}</figcaption></figure>')


def render_html(title: str, sections: list[Section], report_dir: Path) -> str:
    """The page; PNGs are read from ``report_dir`` and embedded."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(table_html(b))
            elif isinstance(b, Figure):
                parts.append(figure_html(b, report_dir))
            else:
                parts.append(f"<p>{_inline(b)}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
