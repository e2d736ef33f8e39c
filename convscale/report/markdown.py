"""The report as Markdown (``summary.md``): the same sections as the HTML page, figures linked."""

from __future__ import annotations

from convscale.report.content import Figure, Section, Table


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    """Markdown text of ``sections``; figures refer to the PNG next to the file (SVG linked)."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out.append(table_markdown(b))
            elif isinstance(b, Figure):
                out.append(f"![{b.name}]({b.name}.png)")
                out.append("")
                out.append(f"*{b.caption}* ([SVG]({b.name}.svg))")
            else:
                out.append(str(b))
            out.append("")
    return "\n".join(out).rstrip() + "\n"
