"""SYNTAX / CASS coronary segments (the ARCADE naming) and the Stage 1 category.

``SEGMENTS`` is the single source of truth for ids, slugs and text prompts. Integer label ids
(used in ``segment_mask_path`` label maps and as COCO category ids) are assigned once, here,
and never change: lettered ARCADE names ("9a", "16c") get ids above 16, and 26 is the catheter
(synthetic data labels it). These ids are angioexp's own: ARCADE numbers its 26 categories
differently (its 26 is "stenosis", a lesion, not a segment); the ARCADE importer and export map
by SYNTAX name (``angioexp.data.importers.arcade.ARCADE_CATEGORIES``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    label: int  # integer id in segment label maps and COCO category id (Stage 2)
    syntax: str  # SYNTAX / ARCADE name: "1" … "16c"
    slug: str  # machine name used in metric keys: val/AP75/<slug>
    prompt: str  # text prompt given to the model
    system: str  # "right", "left" or "device"


# fmt: off
SEGMENTS: tuple[Segment, ...] = (
    Segment(1,  "1",   "rca_proximal", "proximal right coronary artery", "right"),
    Segment(2,  "2",   "rca_mid",      "mid right coronary artery", "right"),
    Segment(3,  "3",   "rca_distal",   "distal right coronary artery", "right"),
    Segment(4,  "4",   "rpda",         "right posterior descending artery", "right"),
    Segment(5,  "5",   "left_main",    "left main coronary artery", "left"),
    Segment(6,  "6",   "lad_proximal", "proximal left anterior descending", "left"),
    Segment(7,  "7",   "lad_mid",      "mid left anterior descending", "left"),
    Segment(8,  "8",   "lad_distal",   "distal (apical) left anterior descending", "left"),
    Segment(9,  "9",   "diagonal_1",   "first diagonal", "left"),
    Segment(10, "10",  "diagonal_2",   "second diagonal", "left"),
    Segment(11, "11",  "lcx_proximal", "proximal circumflex", "left"),
    Segment(12, "12",  "intermediate", "ramus intermedius", "left"),
    Segment(13, "13",  "lcx_distal",   "distal circumflex", "left"),
    Segment(14, "14",  "lpl",          "left posterolateral branch", "left"),
    Segment(15, "15",  "lpda",         "left posterior descending", "left"),
    Segment(16, "16",  "rplb",         "right posterolateral branch", "right"),
    Segment(17, "9a",  "diagonal_1a",  "first diagonal branch a", "left"),
    Segment(18, "10a", "diagonal_2a",  "second diagonal branch a", "left"),
    Segment(19, "12a", "om_1",         "first obtuse marginal", "left"),
    Segment(20, "12b", "om_2",         "second obtuse marginal", "left"),
    Segment(21, "14a", "lpl_a",        "left posterolateral a", "left"),
    Segment(22, "14b", "lpl_b",        "left posterolateral b", "left"),
    Segment(23, "16a", "rplb_a",       "right posterolateral branch a", "right"),
    Segment(24, "16b", "rplb_b",       "right posterolateral branch b", "right"),
    Segment(25, "16c", "rplb_c",       "right posterolateral branch c", "right"),
    Segment(26, "catheter", "catheter", "catheter", "device"),
)
# fmt: on

BY_LABEL: dict[int, Segment] = {s.label: s for s in SEGMENTS}
BY_SYNTAX: dict[str, Segment] = {s.syntax: s for s in SEGMENTS}
BY_SLUG: dict[str, Segment] = {s.slug: s for s in SEGMENTS}

STAGE1_CATEGORY = {"id": 1, "name": "coronary artery", "supercategory": "vessel"}
STAGE1_PROMPT = "coronary artery"


def stage2_categories(labels=None) -> list[dict]:
    """COCO category entries for Stage 2 (all segments, or only ``labels``), sorted by id."""
    chosen = SEGMENTS if labels is None else [BY_LABEL[int(l)] for l in sorted(set(labels))]
    return [
        {"id": s.label, "name": s.slug, "supercategory": s.system, "syntax": s.syntax, "prompt": s.prompt}
        for s in chosen
    ]


def segment_for(value) -> Segment:
    """Look a segment up by integer label, SYNTAX name ("9a") or slug; KeyError if unknown.

    Integers are label ids; strings are SYNTAX names first (so "16" is segment 16), then slugs.
    """
    if isinstance(value, Segment):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return BY_LABEL[value]
    text = str(value).strip()
    if text in BY_SYNTAX:
        return BY_SYNTAX[text]
    if text in BY_SLUG:
        return BY_SLUG[text]
    raise KeyError(f"unknown coronary segment {value!r}")
