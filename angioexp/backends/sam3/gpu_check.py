"""Time SAM3 training steps on synthetic vessel images: s/step and peak memory, as JSON.

    python -m angioexp.backends.sam3.gpu_check                      # 3 steps, 1008 px, bf16, CUDA
    python -m angioexp.backends.sam3.gpu_check --device cpu --resolution 336 --steps 1

Random weights (nothing is downloaded), a tiny COCO set written by :func:`make_tiny_coco`
(thin branching vessel masks on a noisy background), the full angioexp path: generated config
→ SAM3's trainer in a subprocess → events. Prints one JSON object on the last line:
``{"device", "resolution", "amp", "steps", "s_per_step" (steps after the first), "step_seconds",
"peak_mem_gb", "losses", "val", "wall_s"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _draw_vessels(size: int, rng: np.random.Generator) -> np.ndarray:
    """A binary tree of curved vessels 2–7 px wide (cheap; not the realistic generator)."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)

    def branch(x, y, angle, width, length, depth):
        for _ in range(int(length)):
            angle += rng.normal(0, 0.08)
            x, y = x + math.cos(angle), y + math.sin(angle)
            if not (0 <= x < size and 0 <= y < size):
                return
            r = max(width / 2, 1.0)
            x0, x1, y0, y1 = int(max(x - r - 1, 0)), int(min(x + r + 2, size)), int(max(y - r - 1, 0)), int(min(y + r + 2, size))
            mask[y0:y1, x0:x1] |= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= r * r
        if depth > 0:
            for turn in (-0.6, 0.5):
                branch(x, y, angle + turn + rng.normal(0, 0.1), width * 0.7, length * 0.7, depth - 1)

    branch(rng.uniform(0.3, 0.7) * size, 2.0, math.pi / 2 + rng.normal(0, 0.2), rng.uniform(5, 7), size * 0.45, 2)
    return mask


def make_tiny_coco(out: str | Path, *, n_train: int = 2, n_val: int = 1, size: int = 336, seed: int = 0,
                   category: str = "coronary artery") -> Path:
    """A Stage-1-style COCO folder (``{train,val}/images/*.png`` + ``annotations.json``, RLE masks)."""
    import pycocotools.mask as mask_utils
    from PIL import Image

    out = Path(out)
    rng = np.random.default_rng(seed)
    image_id = ann_id = 0
    for split, count in (("train", n_train), ("val", n_val)):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id += 1
            ann_id += 1
            mask = _draw_vessels(size, rng)
            gray = rng.normal(150, 12, (size, size))
            gray[mask] -= 70  # contrast-filled vessels are dark
            name = f"{split}_{i:03d}.png"
            Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).save(out / split / "images" / name)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            images.append({"id": image_id, "file_name": name, "height": size, "width": size,
                           "case_id": f"c{image_id:03d}", "patient_id": f"p{image_id:03d}", "frame_index": 0})
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": rle,
                                "bbox": [x, y, w, h], "area": float(mask.sum()), "iscrowd": 0})
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": category, "supercategory": "vessel"}]}
        (out / split / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
    return out


def check(device: str, resolution: int, steps: int, out: Path, amp: bool = True, batch_size: int = 1) -> dict:
    from angioexp.backends.sam3.run import train_sam3
    from angioexp.config import load_config

    coco = make_tiny_coco(out / "coco", n_train=steps * batch_size, n_val=1, size=min(resolution, 512))
    cfg = load_config(overrides=[
        "backend=sam3", f"scratch.resolution={resolution}", f"train.max_steps={steps}", "train.log_every=1",
        f"scratch.train_batch_size={batch_size}", "scratch.val_batch_size=1", "data.max_val_images=1",
        f"train.device={device}", f"optim.amp.enabled={str(amp).lower()}", "nan_guard.snapshot_every=0",
        "eval.overlays=0",
    ])
    cfg.data.coco_dir = str(coco)
    events: list[tuple[int, dict]] = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, step, metrics):
            events.append((step, metrics))

        def on_eval_end(self, step, metrics, artifacts):
            events.append((-1, metrics))

    started = time.monotonic()
    result = train_sam3(cfg, argparse.Namespace(out=str(out / "run")), callbacks=[Recorder()], save_checkpoints=False)
    step_seconds = [m["train/batch_time_s"] for s, m in events if s >= 0 and "train/batch_time_s" in m]
    # peak CUDA memory allocated (GPU) / peak RSS (CPU), read after each step and after the epoch
    peaks = [m["train/peak_mem_gb"] for s, m in events if "train/peak_mem_gb" in m]
    later = step_seconds[1:] or step_seconds
    return {
        "device": device, "resolution": resolution, "amp": amp and device.startswith("cuda"),
        "batch_size": batch_size, "steps": result.steps,
        "s_per_step": round(sum(later) / len(later), 3) if later else None,
        "step_seconds": [round(s, 3) for s in step_seconds],
        "peak_mem_gb": round(max(peaks), 2) if peaks else None,
        "losses": [round(m["train/loss"], 4) for s, m in events if s >= 0 and "train/loss" in m],
        "val": {k: v for k, v in result.final_metrics.items() if k in ("val/AP", "val/AP75", "val/dice")},
        "wall_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = check(args.device, args.resolution, args.steps, out, amp=not args.no_amp, batch_size=args.batch_size)
    else:
        with tempfile.TemporaryDirectory(prefix="sam3-gpu-check-") as tmp:
            report = check(args.device, args.resolution, args.steps, Path(tmp), amp=not args.no_amp, batch_size=args.batch_size)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
