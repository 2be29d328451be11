"""``preview.png``: a contact sheet to check a synthetic study by eye.

One row per case (up to ``MAX_ROWS``, both coronary systems represented): the first frame
(before or during wash-in), the annotated peak frame, the pseudo-label against the clean label
(green: both, red: missed by the pseudo-label, blue: spurious), and the segment map in colour.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from angioexp.data.synthetic.projection import RIGHT_VIEWS
from angioexp.segments import SEGMENTS

MAX_ROWS = 6
TILE = 256
HEADER = 18


def _palette() -> np.ndarray:
    """(27, 3) uint8: black background, distinct hues per segment label, grey catheter."""
    colours = np.zeros((max(s.label for s in SEGMENTS) + 1, 3), np.uint8)
    for i, seg in enumerate(SEGMENTS):
        if seg.slug == "catheter":
            colours[seg.label] = (170, 170, 170)
            continue
        hue = (i * 0.618034) % 1.0  # golden-ratio spacing keeps neighbours apart
        colours[seg.label] = [int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0)]
    return colours


def _grey(frame: np.ndarray) -> np.ndarray:
    top = 255.0 if frame.dtype == np.uint8 else 4095.0
    g = np.clip(frame.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _blend(base: np.ndarray, colour: np.ndarray, where: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    out = base.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * colour[where] if colour.ndim == 3 else (1 - alpha) * out[where] + alpha * colour
    return out.astype(np.uint8)


def _tile(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    if img.size[0] != TILE:
        img = img.resize((TILE, TILE), Image.Resampling.NEAREST if img.size[0] < TILE else Image.Resampling.BILINEAR)
    return img


def _choose(rows: list[dict]) -> list[int]:
    left = [i for i, r in enumerate(rows) if r["view"] not in RIGHT_VIEWS]
    right = [i for i, r in enumerate(rows) if r["view"] in RIGHT_VIEWS]
    n_right = min(len(right), max(1, MAX_ROWS // 3))
    chosen = left[: MAX_ROWS - n_right] + right[:n_right]
    return sorted(chosen)[:MAX_ROWS]


def contact_sheet(folder: Path, rows: list[dict], details: list[dict]) -> bytes:
    """PNG bytes of the contact sheet for the study in ``folder``."""
    palette = _palette()
    chosen = _choose(rows)
    titles = ("first frame", "peak (annotated) frame", "pseudo vs clean", "segments")
    sheet = Image.new("RGB", (4 * TILE, HEADER + len(chosen) * (TILE + HEADER)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, title in enumerate(titles):
        draw.text((k * TILE + 4, 3), title, fill=(255, 255, 255), font=font)
    for n, i in enumerate(chosen):
        row, detail = rows[i], details[i]
        cine = np.load(folder / row["cine_path"], mmap_mode="r")
        fi = int(row["frame_index"])
        peak = _grey(np.asarray(cine[fi]))
        first = _grey(np.asarray(cine[0]))
        clean = np.load(folder / row["gt_mask_path"]).astype(bool)
        pseudo = np.load(folder / row["mask_path"]).astype(bool)
        seg = np.load(folder / row["segment_mask_path"])
        agree = np.zeros_like(peak)
        agree[clean & pseudo] = (40, 220, 40)
        agree[clean & ~pseudo] = (235, 40, 40)
        agree[pseudo & ~clean] = (60, 110, 255)
        overlay = _blend(peak, agree, clean | pseudo, 0.75)
        segments = _blend(peak, palette[seg], seg > 0, 0.8)
        y = HEADER + n * (TILE + HEADER)
        label = (
            f"{row['case_id']}  {row['split']}  {row['view']} ({row['primary_angle']}/{row['secondary_angle']})  "
            f"{row['dominance']}-dominant  frame {fi}  {detail['dtype']}  pseudo Dice {detail['pseudo_dice']:.3f}"
        )
        draw.text((4, y + 3), label, fill=(255, 255, 120), font=font)
        for k, rgb in enumerate((first, peak, overlay, segments)):
            sheet.paste(_tile(rgb), (k * TILE, y + HEADER))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
