"""Tiny vessel-tree COCO datasets for the core model / training tests (imported by the
test_core_*, test_train_*, test_predict and test_reliability* modules). Independent of the synthetic generator, so these tests
run in a second whatever the rest of the pipeline is doing.

Trees are random walks with branches, drawn dark on a noisy bright background like an
angiogram; Stage 2 labels the trunk and each branch as a different segment category.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from angioexp.segments import BY_LABEL, STAGE1_CATEGORY

STAGE2_LABELS = (6, 7, 9)  # proximal LAD (trunk), mid LAD, first diagonal (branches)


def _walk(rng, start, angle, steps, step_len, size):
    pts = [start]
    x, y = start
    for _ in range(steps):
        angle += rng.normal(0, 0.25)
        x, y = x + step_len * np.cos(angle), y + step_len * np.sin(angle)
        if not (1 <= x < size - 1 and 1 <= y < size - 1):
            break
        pts.append((x, y))
    return pts, angle


def vessel_tree(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """Three bool (size, size) masks: trunk and two branches (some may be empty)."""
    layers = []
    start = (rng.uniform(0.3, 0.7) * size, rng.uniform(0.05, 0.2) * size)
    trunk, angle = _walk(rng, start, np.pi / 2 + rng.normal(0, 0.3), 10, size / 16, size)
    width = max(2, size // 40)
    for pts, w in ((trunk, width + 1),):
        img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).line(pts, fill=1, width=w, joint="curve")
        layers.append(np.asarray(img, bool))
    for k in range(2):
        origin = trunk[min(len(trunk) - 1, 3 + 3 * k)]
        side = -1 if k == 0 else 1
        branch, _ = _walk(rng, origin, np.pi / 2 + side * rng.uniform(0.6, 1.1), 8, size / 20, size)
        img = Image.new("L", (size, size), 0)
        if len(branch) > 1:
            ImageDraw.Draw(img).line(branch, fill=1, width=width, joint="curve")
        layers.append(np.asarray(img, bool) & ~layers[0])
    return layers


def render(rng: np.random.Generator, layers: list[np.ndarray]) -> np.ndarray:
    size = layers[0].shape[0]
    union = np.logical_or.reduce(layers)
    bg = 170 + 20 * rng.standard_normal((size, size))
    bg[union] -= 90
    return np.clip(bg, 0, 255).astype(np.uint8)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_vessel_coco(root: Path, *, stage: int = 1, size: int = 64, n_train: int = 8, n_val: int = 4, seed: int = 0,
                     empty_train_images: int = 0) -> Path:
    """Write ``root/{train,val}/{images/*.png, annotations.json}``; returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if stage == 1:
        categories = [dict(STAGE1_CATEGORY)]
    else:
        categories = [{"id": l, "name": BY_LABEL[l].slug, "supercategory": "left", "prompt": BY_LABEL[l].prompt}
                      for l in STAGE2_LABELS]
    views = [(-30.0, -25.0), (45.0, 25.0), (0.0, 30.0), (None, None)]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            layers = vessel_tree(rng, size)
            if split == "train" and i < empty_train_images:
                layers = [np.zeros_like(m) for m in layers]
            pixels = render(rng, layers)
            name = f"images/{split}_{i:03d}.png"
            Image.fromarray(pixels).save(root / split / name)
            primary, secondary = views[i % len(views)]
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "height": size, "width": size,
                           "case_id": f"{split}{i}", "patient_id": f"p{split}{i}", "frame_index": 0,
                           "primary_angle": primary, "secondary_angle": secondary})
            instances = [(1, np.logical_or.reduce(layers))] if stage == 1 else list(zip(STAGE2_LABELS, layers))
            for category_id, mask in instances:
                if not mask.any():
                    continue
                rle = _rle(mask)
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id,
                             "segmentation": rle, "area": float(mask.sum()),
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
        payload = {"images": images, "annotations": anns, "categories": categories}
        (root / split / "annotations.json").write_text(json.dumps(payload))
    return root

