"""The report as Markdown (``summary.md``): the same sections as the HTML page, figures linked."""

from __future__ import annotations

from convscale.report.content import Figure, Section, Table


def _text(text: object) -> str:
    """Text from results or a study (model names, errors, study names) as inert Markdown: Markdown
    renderers pass raw HTML through, so ``<``, ``>`` and ``&`` become entities (they render the same)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    return _text(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    """Markdown text of ``sections``; figures refer to the PNG next to the file (SVG linked)."""
    out = [f"# {_text(title)}", ""]
    for s in sections:
        out += [f"## {_text(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out.append(table_markdown(b))
            elif isinstance(b, Figure):
                out.append(f"![{_text(b.name)}]({b.name}.png)")
                out.append("")
                out.append(f"*{_text(b.caption)}* ([SVG]({b.name}.svg))")
            else:
                out.append(_text(b))
            out.append("")
    return "\n".join(out).rstrip() + "\n"
