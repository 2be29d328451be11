"""Prediction overlay PNGs: where the model agrees with the truth, and where it does not.

Colours on the grayscale frame: **green** = true positive (predicted with the right
category), **red** = false positive, **blue** = false negative, **magenta** = a vessel pixel
predicted with the wrong category (Stage 2: a false positive for one segment and a false
negative for another). A title strip gives the case, the image's Dice/clDice and the legend.
The worst images by Dice come first; the folder is written atomically.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from angioexp.errors import InputError
from angioexp.evaluate.rle import decode
from angioexp.fileio import atomic_dir, resolve_under

TP_RGB = (0, 200, 0)
FP_RGB = (230, 0, 0)
FN_RGB = (0, 90, 255)
WRONG_CATEGORY_RGB = (220, 0, 220)
ALPHA = 0.7  # colour weight over the frame: strong enough to read 1-px errors
TITLE_PX = 18
MIN_WIDTH = 384  # small frames are enlarged (nearest neighbour) so 1-px errors stay visible


def colour_errors(gray: np.ndarray, truth: dict[int, np.ndarray], predicted: dict[int, np.ndarray]) -> np.ndarray:
    """RGB uint8 (H, W, 3) overlay of per-category truth/prediction masks on a uint8 (H, W) frame."""
    shape = gray.shape
    empty = np.zeros(shape, dtype=bool)
    tp, fp, fn = empty.copy(), empty.copy(), empty.copy()
    for category in set(truth) | set(predicted):
        g = truth.get(category, empty)
        p = predicted.get(category, empty)
        tp |= g & p
        fp |= p & ~g
        fn |= g & ~p
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    # Later layers win: a wrong-category pixel is both FP and FN.
    for pixels, colour in ((tp & ~fp & ~fn, TP_RGB), (fp & ~fn, FP_RGB), (fn & ~fp, FN_RGB), (fp & fn, WRONG_CATEGORY_RGB)):
        rgb[pixels] = (1 - ALPHA) * rgb[pixels] + ALPHA * np.asarray(colour, np.float32)
    return rgb.round().astype(np.uint8)


def _load_gray(images_dir: Path | None, image: dict) -> np.ndarray:
    height, width = image["height"], image["width"]
    if images_dir is None or not image.get("file_name"):
        return np.zeros((height, width), dtype=np.uint8)
    # file_name may be relative to the images folder (plain COCO) or to the split folder
    # ("images/x.png", as `angioexp convert` writes it): try both, never leaving images_dir.
    name = str(image["file_name"])
    candidates = [resolve_under(images_dir, name, file=f"image {image['id']}", column="file_name")]
    candidates.append(resolve_under(images_dir, Path(name).name, file=f"image {image['id']}", column="file_name"))
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise InputError(f"image {image['id']}: file not found", file=candidates[0])
    with Image.open(path) as handle:
        frame = np.asarray(handle.convert("L"))
    if frame.shape != (height, width):
        raise InputError(
            f"image {image['id']}: file is {frame.shape[1]}×{frame.shape[0]}, annotations say {width}×{height}", file=path
        )
    return frame


def render_overlay(gray: np.ndarray, truth: dict, predicted: dict, title: str) -> Image.Image:
    rgb = colour_errors(gray, truth, predicted)
    scale = max(1, -(-MIN_WIDTH // rgb.shape[1]))
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + TITLE_PX), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, TITLE_PX))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(255, 255, 255))
    return canvas


def write_overlays(
    gt,
    detections: list[dict],
    per_image: pd.DataFrame,
    out_dir: Path,
    *,
    images_dir: str | Path | None,
    score_threshold: float,
    max_overlays: int,
) -> list[Path]:
    """One PNG per image for the ``max_overlays`` lowest-Dice images (unscored images last).

    gt: :class:`angioexp.evaluate.evaluator.GroundTruth`; detections: checked predictions.
    Returns the written paths (inside ``out_dir``, which is replaced as a whole).
    """
    images_dir = Path(images_dir) if images_dir is not None else None
    order = per_image.sort_values(["dice", "image_id"], na_position="last").head(max_overlays)
    kept = defaultdict(list)
    for det in detections:
        if det["score"] >= score_threshold:
            kept[det["image_id"], det["category_id"]].append(det["segmentation"])
    # Read every frame first: a missing file must fail before anything is written.
    frames = {int(r.image_id): _load_gray(images_dir, gt.images[int(r.image_id)]) for r in order.itertuples()}
    written = []
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for rank, row in enumerate(order.itertuples(), start=1):
            image_id = int(row.image_id)
            truth, predicted = {}, {}
            for category_id in gt.categories:
                if (image_id, category_id) in gt.unions:
                    truth[category_id] = gt.union_mask(image_id, category_id)
                rles = kept.get((image_id, category_id))
                if rles:
                    merged = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
                    predicted[category_id] = decode(merged)
            label = str(row.case_id) if row.case_id not in ("", None) and not pd.isna(row.case_id) else f"image {image_id}"
            dice = "n/a" if pd.isna(row.dice) else f"{row.dice:.3f}"
            cldice = "n/a" if pd.isna(row.cldice) else f"{row.cldice:.3f}"
            title = f"{label}  Dice {dice}  clDice {cldice}   TP green  FP red  FN blue"
            image = render_overlay(frames[image_id], truth, predicted, title)
            name = f"{rank:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            (tmp / name).write_bytes(buffer.getvalue())
            written.append(out_dir / name)
    return written
