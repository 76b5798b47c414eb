"""A small document model rendered two ways: markdown (figures linked) and one self-contained HTML
page (figures embedded), so a report is written once and reads the same in both."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Callout:
    """A warning the reader must not miss."""

    text: str


@dataclass
class Section:
    """A titled run of blocks: strings are paragraphs; ``data`` is the section's numbers as JSON."""

    title: str
    blocks: list = field(default_factory=list)
    data: dict = field(default_factory=dict)


def to_markdown(title: str, sections: list[Section], relative_to: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                # a "|" inside a cell would end it: escaped, as markdown tables require
                lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                target = os.path.relpath(Path(block.path).resolve(), relative_to.resolve())
                lines.append(f"![{block.caption}]({Path(target).as_posix()})")
                lines.append(f"*{block.caption}*")
            elif isinstance(block, Callout):
                lines.append(f"> **Warning:** {block.text}")
            else:
                lines.append(str(block))
            lines.append("")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:0.9em}
.warning{background:#fff3cd;border-left:4px solid #e0a800;padding:0.6em 1em}"""


def to_html(title: str, sections: list[Section]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows]
                out.append("</table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(Path(block.path).read_bytes()).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block.caption)}'>"
                           f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
            elif isinstance(block, Callout):
                out.append(f"<p class='warning'><b>Warning:</b> {html.escape(block.text)}</p>")
            else:
                out.append(f"<p>{html.escape(str(block))}</p>")
    out.append("</body></html>")
    return "\n".join(out)
