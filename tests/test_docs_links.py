"""Every relative link in README.md and docs/*.md points to a file that exists (and, with a
``#fragment``, to a heading of that file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
# Pages other branches write; linked before they land (docs/configuration.md is generated from
# the config fields by its own command).
GENERATED = {"docs/configuration.md"}


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def relative_links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        rel = file.relative_to(REPO).as_posix() if file.is_relative_to(REPO) else str(file)
        if rel in GENERATED and not file.exists():
            continue
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading '#{fragment}' in {rel}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_checker_sees_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top part\n[a](missing.md) [b](#top-part) [c](https://x.org/y) `[d](e)`\n"
                    "```\n[in](code.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["missing.md", "#top-part"]
    assert "top-part" in anchors(page) and github_anchor("CPU, stage by stage (`--env-manager local`)") == "cpu-stage-by-stage---env-manager-local"
