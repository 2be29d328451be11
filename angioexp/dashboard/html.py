"""The shared page shell of every dashboard page: nav bar, sections, figures, sortable tables.

Pages are static HTML files. plotly.js is loaded one of three ways (``--plotly-js``):

* ``inline`` (default) — the library is embedded in each page that draws a figure: every page
  opens offline on its own, also when viewed as an MLflow artifact (~4.8 MB per such page);
* ``file`` — ``plotly.min.js`` is written once next to the pages and referenced relatively:
  offline and small pages, but a page must stay beside that file;
* ``cdn`` — a ``<script src>`` to cdn.plot.ly (needs network access when viewed).

Pages without figures (the prediction galleries) carry no plotly.js at all. Tables marked
sortable sort on a header click (a few lines of plain JavaScript, no library); numeric cells
carry their value in ``data-v`` so 0.05 sorts before 0.5 and empty cells sort last.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from angioexp.fileio import atomic_file

PLOTLY_MODES = ("inline", "file", "cdn")
PLOTLY_FILE = "plotly.min.js"

# (page file, nav label); paths are relative to the dashboard root.
NAV = (
    ("index.html", "Overview"),
    ("registry.html", "Registry"),
    ("runs.html", "Runs"),
    ("sweeps.html", "Sweeps"),
    ("predictions.html", "Predictions"),
)

CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:0;color:#222;background:#fff}
header{background:#1f2a44;color:#fff;padding:10px 24px}
header a{color:#cfe0ff;margin-right:18px;text-decoration:none}header a.here{color:#fff;font-weight:bold}
main{padding:8px 24px 40px}h1{font-size:22px;margin:14px 0 4px}h2{font-size:17px;margin:26px 0 8px}
h3{font-size:14px;margin:16px 0 6px}.sub{color:#666;font-size:12px;margin:0 0 10px}
.empty{color:#777;font-style:italic;background:#f6f6f6;padding:10px 14px;border-left:3px solid #bbb}
.note{color:#555;font-size:12px}.warn{color:#8a4b00;font-size:12px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}.scroll{overflow-x:auto;max-width:100%}
td,th{border:1px solid #d4d4d4;padding:3px 7px;vertical-align:top;text-align:left}
th{background:#f0f2f6;position:sticky;top:0}table.sortable th{cursor:pointer}
table.sortable th:after{content:" \\21C5";color:#aaa;font-size:10px}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.diff{background:#fff3c4}
.alias{display:inline-block;background:#e6f0ff;border:1px solid #9bbcf0;border-radius:8px;padding:0 6px;margin:0 2px;font-size:11px}
.alias.champion{background:#fff1c2;border-color:#e0b000}
code{font-size:11px;background:#f4f4f4;padding:0 3px}
img.thumb{image-rendering:pixelated;border:1px solid #ccc;transition:transform .1s;transform-origin:left top}
img.thumb:hover{transform:scale(2.2);position:relative;z-index:10;box-shadow:0 2px 10px #0006}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:middle;margin:0 3px 0 10px}
details{margin:4px 0}summary{cursor:pointer;color:#1f4fa0}
"""

# Sort a table on a header click: numbers by data-v, text otherwise; blanks always last.
SORT_JS = """
function angioSort(th){
  var table=th.closest('table'),idx=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
  var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
  function key(r){var c=r.cells[idx];if(!c)return null;var v=c.getAttribute('data-v');
    if(v!==null&&v!==''){var f=parseFloat(v);if(!isNaN(f))return f;}var t=c.textContent.trim();return t===''?null:t;}
  rows.sort(function(a,b){var x=key(a),y=key(b);if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
    if(typeof x==='number'&&typeof y==='number')return asc?x-y:y-x;return asc?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));});
  rows.forEach(function(r){body.appendChild(r);});
}
document.addEventListener('click',function(e){var th=e.target.closest&&e.target.closest('table.sortable th');if(th)angioSort(th);});
"""

esc = html.escape


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats to ``digits`` significant digits, None/NaN as blank."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "" if math.isnan(value) else str(value)
        return f"{value:.{digits}g}"
    return str(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass
class Cell:
    """A table cell with raw HTML (already escaped) and an optional sort value / CSS class."""

    html: str
    sort: float | str | None = None
    css: str = ""


def cell(value: Any, *, digits: int = 4) -> Cell:
    """Plain value → escaped cell; numbers right-aligned and sortable by value."""
    if isinstance(value, Cell):
        return value
    if is_number(value):
        return Cell(esc(fmt(value, digits)), float(value), "num")
    return Cell(esc(fmt(value, digits)))


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, sortable: bool = True, table_id: str | None = None,
          digits: int = 4) -> str:
    """An HTML table; each row item is a value or a :class:`Cell`."""
    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    class_attr = ' class="sortable"' if sortable else ""
    parts = [f'<div class="scroll"><table{id_attr}{class_attr}>',
             "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead><tbody>"]
    for row in rows:
        tds = []
        for item in row:
            c = cell(item, digits=digits)
            attrs = f' class="{c.css}"' if c.css else ""
            if c.sort is not None:
                attrs += f' data-v="{esc(str(c.sort))}"'
            tds.append(f"<td{attrs}>{c.html}</td>")
        parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def alias_badges(aliases: Iterable[str]) -> str:
    return "".join(f'<span class="alias {esc(a)}">{esc(a)}</span>' for a in sorted(aliases))


def plotly_script(mode: str, prefix: str = "") -> str:
    """The ``<script>`` that loads plotly.js in ``mode`` for a page ``prefix`` away from the root."""
    if mode == "inline":
        from plotly.offline import get_plotlyjs

        return f'<script type="text/javascript">{get_plotlyjs()}</script>'
    if mode == "file":
        return f'<script src="{prefix}{PLOTLY_FILE}" charset="utf-8"></script>'
    if mode == "cdn":
        return f'<script src="{cdn_url()}" charset="utf-8"></script>'
    raise ValueError(f"unknown plotly.js mode {mode!r} (expected one of {', '.join(PLOTLY_MODES)})")


def cdn_url() -> str:
    # plotly.py and plotly.js are versioned separately (plotly 7.x bundles plotly.js 4.x).
    from plotly.offline.offline import get_plotlyjs_version

    return f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"


def write_plotly_file(out_dir: Path) -> Path:
    """Write ``plotly.min.js`` into ``out_dir`` (atomically; skipped when already identical)."""
    from plotly.offline import get_plotlyjs

    text = get_plotlyjs()
    path = Path(out_dir) / PLOTLY_FILE
    if path.is_file() and path.stat().st_size == len(text.encode("utf-8")) and path.read_text(encoding="utf-8") == text:
        return path
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        os.chmod(handle.name, 0o644)
    return path


@dataclass
class Page:
    """One dashboard page, assembled from HTML fragments and plotly figures.

    ``path`` is relative to the dashboard root (``registry.html``, ``predictions/x.html``);
    links in the nav bar are made relative to it.
    """

    path: str
    title: str
    subtitle: str = ""
    parts: list[str] = field(default_factory=list)
    figure_ids: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return "../" * self.path.count("/")

    def add(self, fragment: str) -> "Page":
        self.parts.append(fragment)
        return self

    def section(self, anchor: str, title: str) -> "Page":
        return self.add(f'<h2 id="{esc(anchor)}">{esc(title)}</h2>')

    def para(self, text: str, css: str = "") -> "Page":
        class_attr = f' class="{esc(css)}"' if css else ""
        return self.add(f"<p{class_attr}>{esc(text)}</p>")

    def empty(self, text: str) -> "Page":
        """An empty state: says what is missing (and how to get it) instead of a blank area."""
        return self.add(f'<p class="empty">{esc(text)}</p>')

    def figure(self, fig, div_id: str) -> "Page":
        """Embed a plotly figure (its JSON; plotly.js is added once per page by :meth:`render`)."""
        self.figure_ids.append(div_id)
        return self.add(fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        ))

    def render(self, *, plotly_js: str = "inline", generated: str | None = None) -> str:
        here = self.path
        here_attr = ' class="here"'
        nav = "".join(
            f'<a href="{self.prefix}{target}"{here_attr if target == here else ""}>{esc(label)}</a>'
            for target, label in NAV
        )
        stamp = generated or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        head = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)} · angioexp</title>", f"<style>{CSS}</style>",
        ]
        if self.figure_ids:
            head.append(plotly_script(plotly_js, self.prefix))
        body = [
            "</head><body>", f"<header><b>angioexp</b> &nbsp; {nav}</header>", "<main>",
            f"<h1>{esc(self.title)}</h1>",
            f'<p class="sub">{esc(self.subtitle)}{" · " if self.subtitle else ""}generated {esc(stamp)}</p>',
            *self.parts, "</main>", f"<script>{SORT_JS}</script>", "</body></html>",
        ]
        return "\n".join(head + body)

    def write(self, root: Path, *, plotly_js: str = "inline", generated: str | None = None) -> Path:
        """Render and write atomically under ``root``; returns the file path."""
        path = Path(root) / self.path
        text = self.render(plotly_js=plotly_js, generated=generated)
        with atomic_file(path, "w", encoding="utf-8") as handle:
            handle.write(text)
            os.chmod(handle.name, 0o644)  # mkstemp makes it private; a page is meant to be read
        return path
