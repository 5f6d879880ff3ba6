"""A self-contained HTML page of Plotly figures and tables; plotly is imported only when used."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

from floatscope._errors import UsageError

__all__ = ["Page", "finite_or_none"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;
color:#212529}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dee2e6}
h1,p{overflow-wrap:anywhere}
.table{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem} th{white-space:nowrap}
td,th{padding:.25rem .6rem;border-bottom:1px solid #e9ecef;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f8f9fa} .bad{color:#c92a2a;font-weight:600} .ok{color:#2b8a3e}
pre{background:#f8f9fa;padding:.8rem;white-space:pre-wrap;overflow-wrap:anywhere}
.note{color:#495057;font-size:.9rem} .plotly-graph-div{max-width:100%}
"""


def finite_or_none(values: Sequence[float | None]) -> list[float | None]:
    """Plotly cannot draw inf or NaN: they become gaps, which the page labels."""
    return [v if v is not None and math.isfinite(v) else None for v in values]


class Page:
    """Collects sections and figures; :meth:`write` embeds plotly.js once."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self._plotly_included = False

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, css: str = "note") -> None:
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>')

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
        # Wrapped so that a table too wide for the page scrolls inside its box, not the page.
        self.parts.append(f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                          '</table></div>')

    def figure(self, fig: Any, div_id: str) -> None:
        include = not self._plotly_included
        self._plotly_included = True
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=include, div_id=div_id,
                                      config={"displaylogo": False, "responsive": True}))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}"
                "</body></html>", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
        return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise UsageError("HTML reports need plotly: pip install plotly (or pip install 'floatscope[report]')") from None
    return go
