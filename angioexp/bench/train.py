"""Training speed of the core model on CPU (issue 3): images/s at 256² and 512², inference.

The default model and objective (``angioexp.config`` defaults, SAM3's loss), batch 8 of random
crops at the working resolution (crop 256 of 512² frames: the default; whole 512² images:
``scratch.crop_size=null``), 2 threads, synthetic vessel images made on the fly (no data
preparation in the timing). A warm-up step is dropped; the figure is the median of timed steps
(forward + loss + backward + AdamW + batch building). The machine is shared by other jobs
during development, so compare only figures measured in one run. Measured here: 2 threads on a
busy machine (load 4–6) fall to 0.8 img/s while 1 thread still gives ~4 img/s (OpenMP threads
wait on each other) — on a shared machine set ``train.threads=1``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from angioexp.bench import Figure

TITLE = "Core model training speed on CPU (2 threads)"
GOAL_256 = 3.0  # img/s, docs/design.md#performance-goals: a 0.5 M-parameter U-Net's speed at 256², batch 8


def _images_per_s(coco: Path, size: int | None, crop: int | None, steps: int, batch: int = 8, stage: int = 1,
                  extra: tuple[str, ...] = ()) -> tuple[float, int]:
    """Median training images/s; ``size=None``: the stage's default resolution and crop."""
    from angioexp.config import load_config
    from angioexp.losses import build_criterion
    from angioexp.model.build import build_model, count_parameters, resolved_num_views
    from angioexp.train.data import TrainingSet
    from angioexp.train.optim import build_optimizer

    sets = ["init_from=none", f"scratch.train_batch_size={batch}"]
    if size is not None:
        sets += [f"scratch.resolution={size}", f"scratch.crop_size={crop or 'null'}"]
    cfg = load_config(None, [*sets, *extra], stage=stage)
    data = TrainingSet(coco, cfg, num_views=resolved_num_views(cfg))
    model = build_model(cfg)
    criterion, optimizer = build_criterion(cfg), build_optimizer(model, cfg)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        b = data.batch(step)
        loss = criterion(model(b.images, b.queries), b.targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[1:]), count_parameters(model)["total"]


def _inference_per_s(coco: Path, size: int, images: int) -> float:
    from angioexp.config import load_config
    from angioexp.model.build import build_model
    from angioexp.train.inference import predict_split

    cfg = load_config(None, ["init_from=none", f"scratch.resolution={size}", "scratch.val_batch_size=8"], stage=1)
    model = build_model(cfg)
    predict_split(model, coco, "val", cfg=cfg)  # warm-up
    t0 = time.perf_counter()
    predict_split(model, coco, "val", cfg=cfg)
    return images / (time.perf_counter() - t0)


def run(quick: bool) -> list[Figure]:
    import torch

    from angioexp.config import DataConfig
    from angioexp.data.prepare import prepare

    torch.set_num_threads(2)
    steps = 2 if quick else 6
    with tempfile.TemporaryDirectory(prefix="angioexp-bench-train-") as root:
        data_cfg = DataConfig(synth_cases=12, synth_size=512, synth_frames=2, cache_dir=root)
        coco = Path(prepare(data_cfg, 1))
        n_val = len(__import__("json").loads((coco / "val" / "annotations.json").read_text())["images"])
        ips_256, params = _images_per_s(coco, 512, 256, steps)
        ips_512, _ = _images_per_s(coco, 512, None, max(1, steps // 2))
        ips_half, _ = _images_per_s(coco, 256, None, steps)
        infer = _inference_per_s(coco, 512, n_val)
        # Stage 2 default (whole frames at 256², identity head) against Stage 1's 256² crops:
        # the same pixels per image, batch 8 — measured back to back
        coco2 = Path(prepare(data_cfg, 2))
        ips_s2, _ = _images_per_s(coco2, None, None, steps, stage=2)
        ips_s2_per_prompt, _ = _images_per_s(coco2, None, None, steps, stage=2, extra=("loss.per_prompt=true",))
    how = f"default model ({params / 1e6:.2f} M params), batch 8, SAM3 objective, median of {steps} steps"
    return [
        Figure("train images/s, 256² crops of 512² frames (default)", ips_256, "img/s", goal=f">= {GOAL_256:g}",
               met=ips_256 >= GOAL_256, note=how),
        Figure("train images/s, whole 512² frames", ips_512, "img/s", note="scratch.crop_size=null"),
        Figure("train images/s, whole frames resized to 256²", ips_half, "img/s", note="scratch.resolution=256"),
        Figure("inference images/s, whole 512² frames", infer, "img/s",
               note=f"predict_split on {n_val} val frames: model + RLE encoding, text prompt"),
        Figure("Stage 2 step / Stage 1 step (same 256² pixels, batch 8)", ips_256 / ips_s2, "×", goal="<= 1.2",
               met=ips_256 / ips_s2 <= 1.2, note=f"Stage 2 defaults: {ips_s2:.2f} img/s (identity head, no prompt decoded)"),
        Figure("Stage 2 step with SAM3's per-prompt objective / without", ips_s2 / ips_s2_per_prompt, "×",
               note=f"loss.per_prompt=true, 1+1 prompt queries per image: {ips_s2_per_prompt:.2f} img/s"),
        Figure("30-min budget at the default", ips_256 * 1800 / 8, "steps", note="steps of batch 8 in 30 min, before evaluation"),
    ]
