"""``angioexp predict``: apply a trained model to new frames, cines, DICOM XA files or an index.csv.

    predict("models:/angio-stage2@champion", ["run1.dcm", "frame.png"], "out/", threshold=0.5)

The model comes through :func:`angioexp.tracking.models.resolve_model` (``models:/…``,
``runs:/…``, a checkpoint file or folder — as ``init_from`` in training) and runs through the
evaluation's own inference: the frames of each input are laid out as a COCO split (8-bit, the
converter's windowing) and predicted with :func:`angioexp.train.inference.predict_split`, so a
change to how a stage is inferred there reaches ``predict`` too; a SAM3-backend model with
:func:`angioexp.backends.sam3.predict.predict_split` (SAM3's own image inference), which gives
the same results format (:func:`_backend_runner` picks). Per (frame, category) the
results with score ≥ ``threshold`` are merged as the evaluator merges them (Dice and clDice are
computed on the same union); where two categories claim a pixel, the higher-scoring one keeps it.

Output (written into a temporary sibling of ``out`` and renamed into place)::

    predictions.json           COCO results (RLE) of every frame, image ids as in images.json
    images.json                COCO image entries: id, source file, frame, size, spacing, angles
    segments.csv               per frame and label: area (px, mm²), centreline length (px, mm)
    predict.json               model (URI, resolved version / run), threshold, categories, counts, timings
    arcade.json                Stage 2: ARCADE submission (export-arcade's writer; ``arcade=`` puts it elsewhere)
    <input>/labels/frame_NNNN.npy, .png   uint8 label map (PNG: palette, values = labels)
    <input>/overlays/frame_NNNN.png       the frame with the labels tinted
    <input>/overlay.mp4 or overlay_cine.png  a cine's overlay video (MP4 with imageio-ffmpeg, else APNG)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from angioexp.errors import InputError
from angioexp.fileio import refuse_output_over_inputs

log = logging.getLogger(__name__)

ARCADE_FILE = "arcade.json"
NO_ARCADE_STAGE1 = "no ARCADE file: ARCADE's format holds SYNTAX segments, and this is a Stage 1 model"
NO_ARCADE_SEGMENTS = "no ARCADE file: none of the queried segments is one of ARCADE's 25 (--prompts)"


def _no_arcade_reason(cfg, categories: list[dict]) -> str | None:
    """Why no ARCADE file is written (None: it is)."""
    from angioexp.evaluate.arcade import NON_ARCADE_LABELS

    if cfg.stage != 2:
        return NO_ARCADE_STAGE1
    if all(c["id"] in NON_ARCADE_LABELS for c in categories):
        return NO_ARCADE_SEGMENTS
    return None


def load_model(uri: str, device: str = "cpu", *, check=None):
    """(model, cfg, ResolvedModel) for the core- or SAM3-backend model behind ``uri``.

    ``check(cfg)`` runs before the model is built when the config comes with the weights (a
    registered model, a run folder): a bad request fails before a SAM3 build of a minute."""
    from angioexp.tracking.models import resolve_model
    from angioexp.checkpoints import config_from_dict

    text = str(uri).strip()
    if text.startswith(("models:/", "runs:/")):
        from angioexp.tracking.uri import configure_mlflow

        configure_mlflow()
    try:
        resolved = resolve_model(text)
    except InputError as exc:  # the resolver speaks of init_from; here the URI came from --model
        raise InputError(exc.reason, key="--model") from None
    cfg = config_from_dict(resolved.config, source=text) if resolved.config else None
    backend = (cfg.backend if cfg is not None else _stored_backend(resolved.weights))
    if backend == "sam3":
        from angioexp.backends.sam3 import sam3_available

        if not sam3_available():
            raise InputError("is a SAM3 model: install the sam3 extra first (pip install 'angioexp[sam3]', "
                             "see docs/sam3.md)", file=text)
    if check is not None and cfg is not None:
        check(cfg)
    load, _ = _backend_runner(backend)
    model, cfg = load(str(resolved.weights), cfg, device)
    model.eval()
    return model, cfg, resolved


def _backend_runner(backend: str):
    """(load(weights, cfg or None, device) → (model, cfg), predict_split) of a backend: the one
    place where predict tells the backends apart. Both predict_split give COCO results alike."""
    if backend == "sam3":
        from angioexp.backends.sam3 import predict as sam3_predict

        return sam3_predict.load_model, sam3_predict.predict_split
    import torch

    from angioexp.train.inference import _load_model, predict_split

    return (lambda weights, cfg, device: _load_model(weights, cfg, torch.device(device))), predict_split


def _stored_backend(weights: Path) -> str:
    """The backend of a checkpoint without a config beside it: its stored config's, else SAM3
    when its tensors are SAM3's (a SAM3 run's model_weights.pt is a bare state dict)."""
    from angioexp.backends.sam3.weights import looks_like_sam3, read_payload
    from angioexp.checkpoints import extract_state_dict

    payload = read_payload(weights)  # memory-mapped: a SAM3 file is ~3.4 GB
    stored = payload.get("config") if isinstance(payload, dict) else None
    if isinstance(stored, dict):
        return str(stored.get("backend") or "core")
    try:
        state = extract_state_dict(payload)
    except InputError:
        return "core"  # the core loader names what is wrong with the file
    return "sam3" if looks_like_sam3(state) else "core"


def categories_for(cfg, prompts: list[str] | None) -> list[dict]:
    """COCO categories to query: Stage 1 its prompt(s); Stage 2 the segments (all by default),
    named by SYNTAX name ("6", "9a"), slug or label id."""
    from angioexp.segments import STAGE1_CATEGORY, STAGE1_PROMPT, segment_for, stage2_categories

    if cfg.stage == 1:
        texts = prompts or [STAGE1_PROMPT]
        return [dict(STAGE1_CATEGORY, id=i, name=t, prompt=t) for i, t in enumerate(texts, start=1)]
    if not prompts:
        return stage2_categories()
    labels = []
    for text in prompts:
        try:
            labels.append(segment_for(text.strip()).label)
        except KeyError:
            raise InputError("unknown segment (use a SYNTAX name such as 6 or 9a, or a slug such as lad_proximal)",
                             key=f"--prompts {text}") from None
    return stage2_categories(labels)


def _label_map(results: list[dict], shape: tuple[int, int], threshold: float) -> tuple[np.ndarray, dict[int, float]]:
    """Kept results of one frame → uint8 label map (category id = label) and each label's best score."""
    from angioexp.evaluate.evaluator import _merge
    from angioexp.evaluate.rle import decode

    kept: dict[int, list[dict]] = {}
    best: dict[int, float] = {}
    for r in results:
        if r["score"] >= threshold:
            kept.setdefault(r["category_id"], []).append(r["segmentation"])
            best[r["category_id"]] = max(best.get(r["category_id"], 0.0), r["score"])
    labels = np.zeros(shape, dtype=np.uint8)
    for category_id in sorted(kept, key=lambda c: best[c]):  # the best-scoring category paints last
        labels[decode(_merge(kept[category_id]))] = category_id
    return labels, best


def write_frame(folder: Path, stem: str, gray: np.ndarray, results: list[dict], threshold: float,
                names: dict[int, str], spacing_mm: float | None) -> tuple[np.ndarray, list[dict]]:
    """One frame's results → labels/<stem>.npy + .png and overlays/<stem>.png in ``folder``;
    returns the overlay (for a cine's video) and the frame's per-label table rows.

    Plain writes, no fsync per file: ``folder`` lies in the temporary output folder that is
    renamed into place only when everything is written."""
    from angioexp.predict.outputs import label_png, overlay, png, segment_rows

    labels, best = _label_map(results, gray.shape, threshold)
    np.save(folder / "labels" / f"{stem}.npy", labels)
    (folder / "labels" / f"{stem}.png").write_bytes(label_png(labels))
    rgb = overlay(gray, labels)
    (folder / "overlays" / f"{stem}.png").write_bytes(png(rgb))
    return rgb, segment_rows(labels, names, best, spacing_mm)


def predict(model_uri: str, inputs: list[str | Path], out: str | Path, *, prompts: list[str] | None = None,
            threshold: float | None = None, frames: str | None = None, device: str = "cpu",
            overwrite: bool = False, progress: bool = False, arcade: str | Path | None = None) -> dict:
    """Predict every input (see the module docstring); returns the summary written to predict.json.

    ``arcade``: where a Stage 2 model's ARCADE submission goes (default ``out/arcade.json``); an
    existing file there is refused, never replaced (``overwrite`` is for ``out`` only)."""
    from tqdm import tqdm

    from angioexp.data.convert import encode_png_gray8, to_uint8
    from angioexp.fileio import atomic_dir, write_json_atomic
    from angioexp.predict.inputs import input_roots, read_inputs
    from angioexp.predict.outputs import write_video

    if not inputs:
        raise InputError("no --input given", key="--input")
    refuse_output_over_inputs(out, input_roots(inputs))
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output already exists (pass --overwrite to replace it)", file=out)
    if arcade is not None:
        arcade = _check_arcade_target(arcade, out, inputs)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}", key="--threshold")
    sources = read_inputs(inputs, frames)
    from angioexp.train.device import resolve_device

    device = resolve_device(device, key="--device")
    t0 = time.perf_counter()
    model, cfg, resolved = load_model(model_uri, device, check=lambda c: _plan(c, prompts, arcade))
    load_s = time.perf_counter() - t0
    _, predict_split = _backend_runner(cfg.backend)
    threshold = cfg.eval.score_threshold if threshold is None else float(threshold)
    categories, no_arcade = _plan(cfg, prompts, arcade)
    names = {c["id"]: c["name"] for c in categories}
    total = sum(len(s.frame_indices) for s in sources)
    timings = {"load_model": load_s, "predict": 0.0, "write": 0.0}
    all_results: list[dict] = []
    images: list[dict] = []
    table: list[dict] = []
    bar = tqdm(total=total, unit="frame", desc="predict", disable=not progress)
    with atomic_dir(out, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory(prefix="angioexp-predict-") as scratch:
        for source in sources:
            folder = tmp / source.name
            (folder / "labels").mkdir(parents=True)
            (folder / "overlays").mkdir()
            video: list[np.ndarray] = []
            chunk = max(1, int(cfg.scratch.val_batch_size))
            for start in range(0, len(source.frame_indices), chunk):
                indices = source.frame_indices[start : start + chunk]
                t0 = time.perf_counter()
                grays = [to_uint8(np.asarray(source.frames[i])) for i in indices]
                entries = [_image_entry(len(images) + k + 1, source, i, g.shape) for k, (i, g) in enumerate(zip(indices, grays))]
                coco_dir = _as_coco(Path(scratch), entries, grays, categories, encode_png_gray8)
                results = predict_split(model, coco_dir, "frames", device=device, cfg=cfg, categories=categories)
                timings["predict"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                by_image: dict[int, list[dict]] = {}
                for r in results:
                    by_image.setdefault(r["image_id"], []).append(r)
                for entry, gray in zip(entries, grays):
                    stem = f"frame_{entry['frame_index']:04d}"
                    rgb, rows = write_frame(folder, stem, gray, by_image.get(entry["id"], []), threshold, names,
                                            source.pixel_spacing_mm)
                    if source.is_cine:
                        video.append(rgb)
                    table += [{"source": source.name, "frame_index": entry["frame_index"], **row} for row in rows]
                    entry["file_name"] = f"{source.name}/overlays/{stem}.png"
                all_results += results
                images += entries
                timings["write"] += time.perf_counter() - t0
                bar.update(len(indices))
            if video:
                t0 = time.perf_counter()
                write_video(folder, video, source.fps)
                timings["write"] += time.perf_counter() - t0
        bar.close()
        t0 = time.perf_counter()
        write_json_atomic(tmp / "predictions.json", all_results, indent=None)
        write_json_atomic(tmp / "images.json", images)
        _write_table(tmp / "segments.csv", table)
        summary = {
            "model": {"uri": str(model_uri), "weights_from": resolved.short, "model_name": resolved.model_name,
                      "version": resolved.version, "run_id": resolved.run_id, "stage": cfg.stage, "backend": cfg.backend},
            "device": device, "score_threshold": threshold, "mask_threshold": cfg.eval.mask_threshold,
            "categories": categories, "inputs": [str(p) for p in inputs], "sources": len(sources), "frames": total,
            "overlap_rule": "a pixel claimed by several categories gets the highest-scoring one",
            "arcade": None if no_arcade else str(arcade or out / ARCADE_FILE), "no_arcade": no_arcade,
        }
        timings["write"] += time.perf_counter() - t0
        summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        write_json_atomic(tmp / "predict.json", summary)
        if not no_arcade:  # last: a failure before it leaves nothing behind, here or at --arcade
            _write_arcade(arcade or tmp / ARCADE_FILE, images, categories, all_results, threshold)
    return summary


def _plan(cfg, prompts: list[str] | None, arcade: Path | None) -> tuple[list[dict], str | None]:
    """(categories to query, why no ARCADE file is written or None); refuses unknown prompts and
    an --arcade that this model cannot fill."""
    categories = categories_for(cfg, prompts)
    no_arcade = _no_arcade_reason(cfg, categories)
    if arcade is not None and no_arcade:
        raise InputError(no_arcade, key="--arcade")
    return categories, no_arcade


def _check_arcade_target(arcade: str | Path, out: Path, inputs) -> Path:
    """--arcade refused up front: an input, inside ``out`` (that folder is replaced whole), or an
    existing file (a submission is never overwritten)."""
    from angioexp.predict.inputs import input_roots

    arcade = refuse_output_over_inputs(arcade, input_roots(inputs), option="--arcade")
    if arcade.resolve().is_relative_to(out.resolve()):
        raise InputError(f"lies inside --out; leave --arcade out to get {out / ARCADE_FILE}", file=arcade, key="--arcade")
    if arcade.exists():
        raise InputError("ARCADE output already exists (choose another --arcade; it is never overwritten)",
                         file=arcade, key="--arcade")
    return arcade


def _write_arcade(path: Path, images: list[dict], categories: list[dict], results: list[dict], threshold: float) -> None:
    """The predictions in ARCADE's submission format, by ``angioexp export-arcade``'s writer: its
    26 categories and ids, one annotation of polygons per frame and segment at score ≥ threshold;
    frames named by ``arcade_file_name`` (images.json)."""
    from angioexp.evaluate.export_arcade import export_arcade

    frames = [{**image, "source_file_name": image["arcade_file_name"]} for image in images]
    export_arcade({"images": frames, "annotations": [], "categories": categories}, results, path,
                  score_threshold=threshold)


def _image_entry(image_id: int, source, frame_index: int, shape: tuple[int, int]) -> dict:
    # ARCADE matches frames by file name: a frame file keeps its name (ARCADE's own are 1.png …),
    # a cine's frames are named by cine and frame
    arcade_name = f"{source.name}.png" if source.kind == "image" else f"{source.name}_frame_{frame_index:04d}.png"
    return {"id": image_id, "file_name": f"images/{image_id}.png", "height": int(shape[0]), "width": int(shape[1]),
            "source": str(source.path), "source_name": source.name, "frame_index": int(frame_index),
            "arcade_file_name": arcade_name,
            "pixel_spacing_mm": source.pixel_spacing_mm, "primary_angle": source.primary_angle,
            "secondary_angle": source.secondary_angle}


def _as_coco(scratch: Path, entries: list[dict], grays: list[np.ndarray], categories: list[dict], encode) -> Path:
    """The frames as a one-split COCO folder (no annotations): what the evaluation's inference reads."""
    split = scratch / "frames"
    (split / "images").mkdir(parents=True, exist_ok=True)
    for entry, gray in zip(entries, grays):
        (split / entry["file_name"]).write_bytes(encode(gray))
    payload = {"images": entries, "annotations": [], "categories": categories}
    (split / "annotations.json").write_text(json.dumps(payload), encoding="utf-8")
    return scratch


def _write_table(path: Path, rows: list[dict]) -> None:
    from angioexp.fileio import write_bytes_atomic

    columns = ["source", "frame_index", "label", "segment", "score", "area_px", "area_mm2", "centreline_px", "centreline_mm"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
