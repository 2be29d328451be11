"""The MLflow "model from code" behind every angioexp LoggedModel (see tracking/models.py).

MLflow copies this file into the model and runs it on load; nothing is unpickled. The
artifacts are ``weights.pt`` (a bare state dict, read with ``weights_only=True``),
``config.yaml`` (builds the architecture) and ``model_info.json``.

    model = mlflow.pyfunc.load_model("models:/angio-stage1@champion")
    model.predict(pd.DataFrame({"image": [uint8_hw_array_or_png_path], "prompt": ["coronary artery"]}))
    # → DataFrame: row, prompt, score, segmentation (COCO RLE dict at the input's size)

Each row is one text-prompted find query (default prompt: "coronary artery"; Stage 2 prompts
are segment names such as "proximal left anterior descending"), scored as SAM3 does
(sigmoid(class) × sigmoid(presence)). Only the ``core`` backend has pyfunc inference; a
``sam3`` model still serves its weights (``init_from``) and ``predict`` says so.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


def _as_uint8_image(value):
    """H×W uint8 array from an array or an image path (8-bit grayscale)."""
    import numpy as np
    from PIL import Image

    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        with Image.open(value) as im:
            return np.asarray(im.convert("L"))
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        array = array.mean(axis=-1)
    if array.ndim != 2:
        raise mlflow.exceptions.MlflowException(f"expected an H×W image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return array


def predict_images(model, cfg, images, prompts, *, score_threshold: float, batch_size: int = 4) -> list[dict]:
    """Text-prompted find queries on raw images → one dict per kept object query."""
    import torch

    from angioexp.model.build import resolved_num_views
    from angioexp.model.prompt_encoder import PromptTokenizer
    from angioexp.train.data import _Query, _resize_image, collate
    from angioexp.train.inference import predict_batch

    tokenizer = PromptTokenizer()
    num_views = resolved_num_views(cfg)
    size = cfg.scratch.resolution
    rows: list[dict] = []
    model.eval()
    for start in range(0, len(images), batch_size):
        chunk = [_as_uint8_image(im) for im in images[start : start + batch_size]]
        chunk_prompts = prompts[start : start + batch_size]
        texts = {i: p for i, p in enumerate(chunk_prompts)}  # one "category" per row
        queries = [_Query(slot, slot, [], [], None) for slot in range(len(chunk))]
        batch = collate(
            [_resize_image(im, size) for im in chunk], [num_views] * len(chunk), queries, tokenizer, texts,
            use_text=True, num_views=num_views, image_ids=list(range(start, start + len(chunk))),
        )
        with torch.no_grad():
            results = predict_batch(model, batch, [im.shape for im in chunk], mask_threshold=cfg.eval.mask_threshold,
                                    min_score=score_threshold)
        for r in results:
            rows.append({"row": r["image_id"], "prompt": chunk_prompts[r["image_id"] - start], "score": r["score"],
                         "segmentation": r["segmentation"]})
    return rows


class AngioexpModel(PythonModel):
    def load_context(self, context):
        from angioexp.checkpoints import load_state_with_report, read_checkpoint
        from angioexp.config import load_config

        self.cfg = load_config(context.artifacts["config"], stored=True)  # the model's own run config
        state = read_checkpoint(context.artifacts["weights"])  # weights_only=True
        self.model = None
        if self.cfg.backend == "core":
            from angioexp.model.build import build_model

            self.model = build_model(self.cfg).eval()
            # every tensor must fit: this is the model these weights were trained as
            load_state_with_report(self.model, state, source="weights.pt", min_loaded_fraction=1.0)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from angioexp.segments import STAGE1_PROMPT

        if self.model is None:
            raise mlflow.exceptions.MlflowException(
                f"pyfunc inference is implemented for the core backend; this is a {self.cfg.backend} model "
                "(its artifacts/weights.pt serves init_from and the sam3 backend's evaluation)"
            )
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        if "image" not in frame.columns:
            raise mlflow.exceptions.MlflowException("input needs an 'image' column (H×W uint8 arrays or image paths)")
        prompts = [str(p) for p in frame["prompt"]] if "prompt" in frame.columns else [STAGE1_PROMPT] * len(frame)
        threshold = float((params or {}).get("score_threshold", self.cfg.eval.score_threshold))
        rows = predict_images(self.model, self.cfg, list(frame["image"]), prompts, score_threshold=threshold)
        return pd.DataFrame(rows, columns=["row", "prompt", "score", "segmentation"])


mlflow.models.set_model(AngioexpModel())
