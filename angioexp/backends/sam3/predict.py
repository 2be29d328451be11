"""``angioexp predict`` for SAM3-backend models: the backend's own build and verified weight load,
then SAM3's own image inference.

    model, cfg = load_model(weights, cfg, "cpu")
    results = predict_split(model, coco_dir, "frames", device="cpu", cfg=cfg, categories=categories)

The contract is that of :func:`angioexp.train.inference.predict_split` (the core path): COCO
results (RLE masks at the frame's size) for every image of ``coco_dir/split`` and every category,
score = sigmoid(class) × sigmoid(presence), results below ``MIN_SCORE`` dropped. Inference is
``sam3.model.sam3_image_processor.Sam3Processor``: the frame (as RGB, the way SAM3's trainer
reads the converted gray PNGs) is resized to ``scratch.resolution`` and normalised as SAM3's
validation does, the image backbone runs once per frame, then one text-prompted grounding pass per
category (the prompt SAM3 trained with, :func:`~angioexp.backends.sam3.config_gen.category_prompt`);
mask probabilities are upsampled to the frame and thresholded at ``eval.mask_threshold``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from angioexp.errors import InputError
from angioexp.train.device import amp_dtype

log = logging.getLogger(__name__)

# Of the model's tensors, the share a predicting model must get from its weights: everything but
# the RoPE tables, which are recomputed for the resolution (~3% of SAM3's tensors). Training may
# start from less (cfg.min_loaded_fraction); predicting with half-random weights would be noise.
PREDICT_MIN_LOADED_FRACTION = 0.95


def _stored_config(weights: Path):
    """The angioexp config stored beside the tensors (``{"model": …, "config": …}``), or None."""
    from angioexp.backends.sam3.weights import read_payload

    payload = read_payload(weights)
    stored = payload.get("config") if isinstance(payload, dict) else None
    return stored if isinstance(stored, dict) else None


def _cpu_only(device: torch.device):
    """SAM3's CPU shims while it runs on the CPU (it creates some tensors on "cuda" itself)."""
    from angioexp.backends.sam3.cpu import cpu_shims

    return cpu_shims(force=True) if device.type == "cpu" else contextlib.nullcontext()


def load_model(weights: str | Path, cfg, device: str = "cpu"):
    """(SAM3 image model in eval mode on ``device``, cfg) for the weights at ``weights``.

    ``cfg`` None: the config stored in the checkpoint, else SAM3's defaults (Stage 1, 1008 px) —
    a bare weights file does not say what it was trained as."""
    from angioexp.backends.sam3.model import build_sam3_model

    weights = Path(weights)
    if cfg is None:
        from angioexp.config import load_config
        from angioexp.checkpoints import config_from_dict

        stored = _stored_config(weights)
        if stored is not None:
            cfg = config_from_dict(stored, source=weights)
        else:
            cfg = load_config(backend="sam3")
            log.warning("%s carries no config: predicting as a Stage %d SAM3 model at %d px (SAM3's defaults); "
                        "use the registered model or a folder with its config.yaml for anything else",
                        weights, cfg.stage, cfg.scratch.resolution)
    if not cfg.scratch.enable_segmentation:
        raise InputError("is a SAM3 model without a mask head (scratch.enable_segmentation=false): "
                         "predict needs masks", file=weights)
    device = torch.device(device)
    # The vocabulary is one fixed file (md5-checked): a path from the training machine that is not
    # here falls back to the installed copy. sam3.checkpoint_prefix described the *init* weights
    # of that training, not these (SAM3's own state dict, or found by key suffixes).
    bpe_path = cfg.sam3.bpe_path if cfg.sam3.bpe_path and Path(cfg.sam3.bpe_path).expanduser().is_file() else None
    model = build_sam3_model(
        bpe_path=bpe_path, resolution=cfg.scratch.resolution, enable_segmentation=True,
        activation_checkpointing=False, checkpoint=str(weights), checkpoint_prefix=None,
        min_loaded_fraction=PREDICT_MIN_LOADED_FRACTION, eval_mode=True,
    )
    model = model.to(device).eval()
    model._device = None  # Sam3Image caches its device on first use; it has moved since the build
    return model, cfg


@torch.inference_mode()
def predict_split(model, coco_dir: str | Path, split: str, *, device: str = "cpu", cfg=None,
                  categories: list[dict] | None = None) -> list[dict]:
    """COCO segmentation results of ``model`` on every image of ``coco_dir/split`` (see the module
    docstring); ``categories`` default to the split's."""
    import numpy as np
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    from angioexp.backends.sam3.config_gen import category_prompt
    from angioexp.data.coco import prediction_source
    from angioexp.fileio import resolve_under
    from angioexp.train.inference import MIN_SCORE, _encode

    if cfg is None:
        raise ValueError("predicting with a SAM3 model object needs its cfg")
    split_dir = Path(coco_dir) / split
    annotations = split_dir / "annotations.json"
    data = json.loads(annotations.read_text(encoding="utf-8"))
    categories = categories or data["categories"]
    device = torch.device(device)
    processor = Sam3Processor(model, resolution=cfg.scratch.resolution, device=device, confidence_threshold=MIN_SCORE)
    autocast = device.type == "cuda" and cfg.optim.amp.enabled
    dtype = amp_dtype(cfg.optim.amp.amp_dtype)
    source = prediction_source(coco_dir, split)
    results: list[dict] = []
    with _cpu_only(device), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        for row, image in enumerate(data["images"]):
            path = resolve_under(split_dir, image["file_name"], file=annotations, row=row, column="file_name")
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
            state = processor.set_image(rgb)
            for category in categories:
                state = processor.set_text_prompt(category_prompt(category), state)
                probabilities = state["masks_logits"][:, 0].float()  # (k, H, W): sigmoid, despite the name
                masks = (probabilities > cfg.eval.mask_threshold).cpu().numpy()
                for mask, score in zip(masks, state["scores"].float().tolist()):
                    if np.any(mask):
                        results.append({"image_id": int(image["id"]), "category_id": int(category["id"]),
                                        "segmentation": _encode(mask), "score": float(score), **source})
    return results
