"""Benchmarks: ``python -m angioexp.bench [--only AREA ...] [--quick]``.

Each area is a module ``angioexp.bench.<area>`` with ``TITLE`` and ``run(quick: bool) ->
list[Figure]``. Results replace that area's section of BENCHMARKS.md (between markers), so
areas can be re-measured one at a time. Comparisons are ratios measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

AREAS = ("data", "train", "evaluate", "quality", "tracking", "sweep", "sam3", "predict", "stage2")


@dataclass
class Figure:
    name: str  # what was measured
    value: float | str
    unit: str = ""
    goal: str = ""  # e.g. ">= 100 frames/s"
    met: bool | None = None  # None: no goal or not comparable
    note: str = ""  # how: command, sizes, caveats


def machine_line() -> str:
    try:
        import torch

        torch_v = torch.__version__
        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - torch is optional for the data benchmarks
        torch_v, threads = "n/a", "n/a"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch_v} ({threads} threads), "
        # Other jobs on the same cores skew absolute speeds; the load average says whether they ran.
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


def render_section(area: str, title: str, figures: list[Figure], command: str) -> str:
    lines = [
        f"<!-- bench:{area} start -->",
        f"## {title}",
        "",
        f"Measured {_dt.date.today().isoformat()} on {machine_line()}. Reproduce: `{command}`",
        "",
        "| measurement | value | goal | met | how |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        value = f"{f.value:.4g} {f.unit}".strip() if isinstance(f.value, (int, float)) else f"{f.value} {f.unit}".strip()
        met = "" if f.met is None else ("yes" if f.met else "**no**")
        lines.append(f"| {f.name} | {value} | {f.goal} | {met} | {f.note} |")
    lines.append(f"<!-- bench:{area} end -->")
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, area: str, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"<!-- bench:{area} start -->.*?<!-- bench:{area} end -->\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
