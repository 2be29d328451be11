"""Time SAM3 training steps on synthetic vessel images: s/step and peak memory, as JSON.

    python -m angioexp.backends.sam3.gpu_check                      # 3 steps, 1008 px, bf16, CUDA
    python -m angioexp.backends.sam3.gpu_check --device cpu --resolution 336 --steps 1

Random weights (nothing is downloaded), a tiny COCO set written by :func:`make_tiny_coco`
(thin branching vessel masks on a noisy background), the full angioexp path: generated config
→ SAM3's trainer in a subprocess → events. Activation checkpointing runs as configured (on,
SAM3's default); if that run fails in its first step or with a ``CheckpointError``, the error
is recorded and the run repeated once with it off (not for failures that would recur). Prints one JSON object on the last line:
``{"ok", "activation_checkpointing" (of the run that passed), "environment", "wall_s",
"text_recompute_probe" ({"sam3_as_shipped", "pinned"}: "ok" or the error of a text-encoder
forward + backward at SAM3's size, as shipped and with angioexp's fix),
"attempts": [{"activation_checkpointing", "ok", "error", "steps_done", "wall_s"} for a failure,
{"activation_checkpointing", "ok", "device", "resolution", "amp", "steps", "s_per_step" (steps
after the first), "step_seconds", "peak_mem_gb", "losses", "val", "wall_s"} for a pass]}``.
Exit status 0 when one attempt passed.
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


def check(device: str, resolution: int, steps: int, out: Path, amp: bool = True, batch_size: int = 1,
          activation_checkpointing: bool = True, timeout_s: float | None = None) -> dict:
    """One training run; raises what ``train_sam3`` raises. ``out``: a fresh work folder."""
    from angioexp.backends.sam3.run import train_sam3
    from angioexp.config import load_config

    coco = make_tiny_coco(out / "coco", n_train=steps * batch_size, n_val=1, size=min(resolution, 512))
    cfg = load_config(overrides=[
        "backend=sam3", f"scratch.resolution={resolution}", f"train.max_steps={steps}", "train.log_every=1",
        f"scratch.train_batch_size={batch_size}", "scratch.val_batch_size=1", "data.max_val_images=1",
        f"train.device={device}", f"optim.amp.enabled={str(amp).lower()}", "nan_guard.snapshot_every=0",
        "eval.overlays=0", f"sam3.activation_checkpointing={str(activation_checkpointing).lower()}",
        *(["scratch.num_train_workers=0"] if device == "cpu" else []),  # SAM3's 10 workers: GPU hosts
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
    try:
        result = train_sam3(cfg, argparse.Namespace(out=str(out / "run")), callbacks=[Recorder()],
                            save_checkpoints=False, timeout_seconds=timeout_s)
    except Exception as exc:
        exc.steps_done = sum(1 for s, _ in events if s >= 0)  # type: ignore[attr-defined]
        raise
    step_seconds = [m["train/batch_time_s"] for s, m in events if s >= 0 and "train/batch_time_s" in m]
    # peak CUDA memory allocated (GPU) / peak RSS (CPU), read after each step and after the epoch
    peaks = [m["train/peak_mem_gb"] for s, m in events if "train/peak_mem_gb" in m]
    later = step_seconds[1:] or step_seconds
    return {
        "device": device, "resolution": resolution, "amp": amp and device.startswith("cuda"),
        "activation_checkpointing": activation_checkpointing,
        "batch_size": batch_size, "steps": result.steps,
        "s_per_step": round(sum(later) / len(later), 3) if later else None,
        "step_seconds": [round(s, 3) for s in step_seconds],
        "peak_mem_gb": round(max(peaks), 2) if peaks else None,
        "losses": [round(m["train/loss"], 4) for s, m in events if s >= 0 and "train/loss" in m],
        "val": {k: v for k, v in result.final_metrics.items() if k in ("val/AP", "val/AP75", "val/dice")},
        "wall_s": round(time.monotonic() - started, 1),
    }


def probe_text_recompute(device: str) -> dict[str, str]:
    """The checkpoint recompute of SAM3's text encoder, in seconds: two blocks of its real size
    (width 1024, 16 heads, 32 tokens) run through SAM3's own ``forward_text`` (bf16 autocast on
    CUDA), then backward — as SAM3 ships them and with angioexp's pinned attention kernels.
    ``{"sam3_as_shipped": "ok" | error, "pinned": "ok" | error}``: where the full run fails with
    a ``CheckpointError``, this says whether the text encoder is the cause."""
    results: dict[str, str] = {}
    try:
        import torch
        from sam3.model.text_encoder_ve import VETextEncoder
        from sam3.model.tokenizer_ve import SimpleTokenizer
        from sam3.model.vl_combiner import SAM3VLBackbone

        from angioexp.backends.sam3.act_ckpt import pin_text_attention_kernels
        from angioexp.backends.sam3.model import init_text_encoder
        from angioexp.backends.sam3.weights import find_bpe_vocab

        tokenizer = SimpleTokenizer(bpe_path=str(find_bpe_vocab()))
        cuda = device.startswith("cuda")
    except Exception as exc:  # noqa: BLE001 - a probe never stops the check
        return {"error": f"{type(exc).__name__}: {exc}"}
    for name, pinned in (("sam3_as_shipped", False), ("pinned", True)):
        try:
            torch.manual_seed(0)
            text = VETextEncoder(d_model=256, tokenizer=tokenizer, width=1024, heads=16, layers=2, context_length=32)
            init_text_encoder(text)
            if pinned:
                pin_text_attention_kernels(text)
            backbone = SAM3VLBackbone(visual=torch.nn.Identity(), text=text).to(device).train()
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                out = backbone.forward_text(["coronary artery"], device=torch.device(device))
            out["language_features"].float().square().sum().backward()
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
    if cuda:
        torch.cuda.empty_cache()  # leave the GPU to the trainer's subprocess
    return results


MIN_RETRY_S = 60.0  # a retry needs at least a model build and one step


def worth_retrying(error_text: str, steps_done: int) -> bool:
    """Checkpointing off can only help a checkpoint recompute error or another failure in the
    first backward pass (the child's traceback, in the error text, goes through ``backward``).
    Failures before it (config, weights), after it (evaluation) or out of memory would recur."""
    if "CheckpointError" in error_text:
        return True
    return steps_done == 0 and "backward" in error_text and "out of memory" not in error_text.lower()


def check_with_fallback(device: str, resolution: int, steps: int, out: Path, *, amp: bool = True,
                        batch_size: int = 1, activation_checkpointing: bool = True, retry: bool = True,
                        budget_s: float | None = None, probe: bool = True) -> dict:
    """``check`` in the configured activation-checkpointing mode; if that fails in its first step
    (or with a ``CheckpointError``), once more with checkpointing off. Every attempt is reported:
    ``{"ok", "activation_checkpointing" (of the run that passed), "environment",
    "text_recompute_probe" (:func:`probe_text_recompute`), "attempts": [...], "wall_s"}``."""
    started = time.monotonic()
    probe_result = probe_text_recompute(device) if probe else None
    print(f"[gpu_check] text-encoder recompute probe: {json.dumps(probe_result)[:500]}", file=sys.stderr, flush=True)
    attempts: list[dict] = []
    modes = [activation_checkpointing] + ([False] if activation_checkpointing and retry else [])
    for i, mode in enumerate(modes):
        left = None if budget_s is None else budget_s - (time.monotonic() - started)
        if i and left is not None and left < MIN_RETRY_S:
            attempts.append({"activation_checkpointing": mode, "ok": False,
                             "skipped": f"{left:.0f} s of the {budget_s:.0f} s budget left"})
            break
        attempt_started = time.monotonic()
        tag = "on" if mode else "off"
        print(f"[gpu_check] activation checkpointing {tag}: training {steps} step(s)", file=sys.stderr, flush=True)
        try:
            report = check(device, resolution, steps, out / f"act_ckpt_{tag}", amp=amp, batch_size=batch_size,
                           activation_checkpointing=mode, timeout_s=left)
        except Exception as exc:  # noqa: BLE001 - recorded, then maybe retried
            error = f"{type(exc).__name__}: {exc}"
            steps_done = getattr(exc, "steps_done", 0)
            attempts.append({"activation_checkpointing": mode, "ok": False, "steps_done": steps_done,
                             "error": error[:6000], "wall_s": round(time.monotonic() - attempt_started, 1)})
            print(f"[gpu_check] activation checkpointing {tag} failed after {steps_done} step(s): "
                  f"{error.splitlines()[0][:300]}", file=sys.stderr, flush=True)
            if not worth_retrying(error, steps_done):
                break
            continue
        attempts.append({"ok": True, **report})
        break
    passed = next((a for a in attempts if a["ok"]), None)
    return {
        "ok": passed is not None,
        "activation_checkpointing": passed["activation_checkpointing"] if passed else None,
        "environment": _environment(device),
        "text_recompute_probe": probe_result,
        "attempts": attempts,
        "wall_s": round(time.monotonic() - started, 1),
    }


def _environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="start with checkpointing off (default: on, SAM3's setting)")
    parser.add_argument("--no-retry", action="store_true",
                        help="do not retry a failed first step with activation checkpointing off")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock limit for all attempts (default: 420 s on CUDA, none on CPU)")
    parser.add_argument("--no-probe", action="store_true", help="skip the text-encoder recompute probe")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (420.0 if args.device.startswith("cuda") else None)
    kwargs = dict(amp=not args.no_amp, batch_size=args.batch_size, retry=not args.no_retry, budget_s=budget,
                  probe=not args.no_probe,
                  activation_checkpointing=not args.no_activation_checkpointing)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = check_with_fallback(args.device, args.resolution, args.steps, out, **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="sam3-gpu-check-") as tmp:
            report = check_with_fallback(args.device, args.resolution, args.steps, Path(tmp), **kwargs)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
