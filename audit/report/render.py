"""The report as one self-contained HTML file (inline CSS with a print stylesheet, charts as inline
SVG, no scripts), and the same HTML rendered to a tagged PDF/A-3b with the data files attached.

The PDF is made offline: WeasyPrint's fetcher refuses every URL, so nothing outside the inputs can
reach the document. Dates and the PDF identifier come from the inputs, so the same inputs give
the same bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from audit.report.sections import Bars, Section

_TEMPLATES = Path(__file__).with_name("templates")
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def bars_svg(chart: Bars, width: int = 720, height: int = 180) -> str:
    """An accessible SVG bar chart (role=img, a title, a description of the extremes)."""
    n = len(chart.values)
    top = max(chart.values) if chart.values else 0
    left, bottom, pad = 56, 28, 8
    plot_w, plot_h = width - left - pad, height - bottom - pad
    step = plot_w / max(n, 1)
    bar = max(step * 0.8, 0.5)
    scale = plot_h / top if top else 0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" aria-labelledby="t">',
        f"<title>{jinja2.utils.markupsafe.escape(chart.title)}</title>",
        f"<desc>{n} bars; highest {_num(top)} {jinja2.utils.markupsafe.escape(chart.unit)}"
        + (f" at {jinja2.utils.markupsafe.escape(chart.labels[chart.values.index(top)])}" if n else "")
        + "</desc>",
        f'<line x1="{left}" y1="{pad + plot_h}" x2="{width - pad}" y2="{pad + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{pad + plot_h}" class="axis"/>',
    ]
    for tick in _ticks(top):
        y = pad + plot_h - tick * scale
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{_num(tick)}</text>')
    for i, value in enumerate(chart.values):
        h = value * scale
        x = left + i * step + (step - bar) / 2
        parts.append(f'<rect x="{x:.2f}" y="{pad + plot_h - h:.2f}" width="{bar:.2f}" height="{h:.2f}" class="bar"/>')
    if n:
        for i in sorted({0, n // 2, n - 1}):
            x = left + i * step + step / 2
            label = jinja2.utils.markupsafe.escape(chart.labels[i])
            parts.append(f'<text x="{x:.1f}" y="{height - 10}" class="tick" text-anchor="middle">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(top: float) -> list[float]:
    if top <= 0:
        return [0]
    magnitude = 10 ** math.floor(math.log10(top))
    step = next(m * magnitude for m in (1, 2, 5, 10) if top / (m * magnitude) <= 5)
    return [i * step for i in range(int(top // step) + 1)]


def _num(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if not value.is_integer() else f"{int(value):,}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def html(sections: Sequence[Section], *, title: str, verdict: str, failed: bool, generated_from: str) -> str:
    template = _env.get_template("report.html.j2")
    return template.render(
        title=title,
        verdict=verdict,
        failed=failed,
        generated_from=generated_from,
        sections=sections,
        svg=bars_svg,
        cell=_cell,
        css=(_TEMPLATES / "report.css").read_text(encoding="utf-8"),
    )


def _refuse(url: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    raise ValueError(f"the report is rendered offline; it fetches nothing ({url})")


def pdf(document: str, attachments: Sequence[tuple[str, bytes]], *, when: str, dest: Path) -> None:
    """Render `document` (the report's HTML) as a tagged PDF/A-3b with `attachments` embedded.

    `when` (RFC 3339) stands for the creation date, so that the file depends only on the inputs.
    """
    import weasyprint  # noqa: PLC0415  (pango is loaded only when a PDF is asked for)

    stamp = _pdf_date(when)
    files = [
        weasyprint.Attachment(
            string=data,
            name=name,
            description=f"report data file {name}",
            created=stamp,
            modified=stamp,
            relationship="Data",
            url_fetcher=_refuse,
        )
        for name, data in attachments
    ]
    identifier = hashlib.sha256(document.encode()).hexdigest()[:32].encode()
    weasyprint.HTML(string=document, url_fetcher=_refuse, base_url=None).write_pdf(
        dest,
        pdf_variant="pdf/a-3b",
        pdf_tags=True,
        attachments=files,
        pdf_identifier=identifier,
        custom_metadata=False,
    )


def _pdf_date(when: str) -> dt.datetime:
    """An entry time ('YYYY-MM-DDTHH:MM:SS...Z') as the UTC datetime WeasyPrint takes for attachment dates."""
    try:
        return dt.datetime.strptime(when[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
