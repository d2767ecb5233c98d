"""The self-contained ``report.html``: inline CSS, PNGs embedded as base64 ``data:`` URIs, no scripts.

The page opens from anywhere (mail attachment, another machine, offline) because it references no
other file and no network resource.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Section", "render_page"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1b1f24;
       background: #f6f7f9; }
header { background: #1f2937; color: #f9fafb; padding: 18px 28px; }
header h1 { margin: 0 0 6px 0; font-size: 22px; }
header .sub { color: #cbd5e1; font-size: 13px; }
main { padding: 8px 28px 40px 28px; max-width: 1500px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 14px 18px; margin: 16px 0; }
h2 { font-size: 18px; margin: 4px 0 10px 0; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 4px 10px; text-align: right; }
th { background: #f3f4f6; }
td:first-child, th:first-child { text-align: left; }
.facts td { text-align: left; }
.note { background: #fff7ed; border-left: 4px solid #f59e0b; padding: 6px 10px; margin: 6px 0; font-size: 13px; }
.muted { color: #6b7280; font-size: 12px; }
pre { background: #f3f4f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.worst { background: #fef2f2; }
"""


@dataclass
class Section:
    """One ``<section>``: a title, then blocks in order (HTML strings, images, notes)."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def html(self, markup: str) -> None:
        """Append trusted markup (built by this package, user strings escaped by the caller)."""
        self.blocks.append(("html", markup))

    def text(self, text: str) -> None:
        self.blocks.append(("html", f"<p>{html.escape(text)}</p>"))

    def note(self, text: str) -> None:
        self.blocks.append(("html", f'<div class="note">{html.escape(text)}</div>'))

    def heading(self, text: str) -> None:
        self.blocks.append(("html", f"<h3>{html.escape(text)}</h3>"))

    def image(self, path: Path, alt: str, width: int, height: int) -> None:
        self.blocks.append(("image", (Path(path), alt, width, height)))


def _image_tag(path: Path, alt: str, width: int, height: int) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}" '
        f'width="{width}" height="{height}" data-file="{html.escape(path.name, quote=True)}">'
    )


def table(header: list[str], rows: list[list[str]], *, row_classes: list[str] | None = None, cls: str = "") -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        rc = row_classes[index] if row_classes else ""
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        body.append(f'<tr class="{rc}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole HTML document, images embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{html.escape(title)}</h1><div class="sub">{html.escape(subtitle)}</div></header><main>',
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for kind, value in section.blocks:
            parts.append(_image_tag(*value) if kind == "image" else value)
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
