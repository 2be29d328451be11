"""Prediction galleries: one page per model version, worst images first.

Each row: the frame, the clean ground truth, the prediction, and the error overlay (TP green,
FP red, FN blue, magenta = vessel predicted as the wrong segment — the colours of
:mod:`angioexp.evaluate.overlays`), with the image's Dice / clDice / Boundary IoU. The table
sorts on any header click; it opens sorted by Dice, worst first.

Data: the version's source run logged, per evaluation, ``eval/step_N/per_image.csv`` (the
evaluator's own per-image scores), ``predictions.json`` (COCO results) and ``metrics.json``;
the evaluation used is the one whose metrics the registered model carries. Frames and truth
come from the COCO folder the run trained on (tag ``angioexp.coco_dir``, else its validation
dataset input). When that folder is not on this machine, the gallery shows the overlay PNGs
the run logged instead. Thumbnails are embedded (JPEG/PNG, data URIs) and downsampled to
``thumb_px`` so that 50 images stay around a megabyte or two.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from angioexp.dashboard.data import (
    VersionInfo,
    download_bytes,
    download_json,
    download_text,
    eval_dir,
    eval_steps,
    list_artifacts,
)
from angioexp.dashboard.html import Cell, Page, alias_badges, esc, fmt, is_number, table

log = logging.getLogger(__name__)

GALLERY_DIR = "predictions"
THUMB_PX = 192
JPEG_QUALITY = 82
STAGE1_RGB = (255, 255, 255)


@dataclass
class Gallery:
    """What one version's gallery page shows (also summarised on predictions.html)."""

    version: VersionInfo
    page_path: str
    step: int | None = None
    per_image: list[dict] = field(default_factory=list)  # rows of per_image.csv, worst Dice first
    source: str = ""  # "frames" | "overlays" | "" (nothing to show)
    note: str = ""

    @property
    def dice_values(self) -> list[float]:
        return [float(r["dice"]) for r in self.per_image if is_number(_num(r.get("dice")))]


def _num(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "model"


# ---------------------------------------------------------------------------------------------
# Images


def _data_uri(image, fmt_name: str) -> str:
    buffer = io.BytesIO()
    if fmt_name == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _fit(image, thumb_px: int):
    """Downsample (box filter: a 1-px vessel becomes a fainter line, not a gap) to ≤ thumb_px."""
    from PIL import Image

    w, h = image.size
    scale = min(1.0, thumb_px / max(w, h))
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BOX)
    return image


def _img(uri: str, size: tuple[int, int], thumb_px: int, alt: str) -> str:
    w, h = size
    scale = thumb_px / max(w, h)  # small frames are shown enlarged (pixelated), large ones as fitted
    return f'<img class="thumb" src="{uri}" width="{round(w * scale)}" height="{round(h * scale)}" alt="{esc(alt)}">'


def category_colours(category_ids) -> dict[int, tuple[int, int, int]]:
    import plotly.express as px

    palette = px.colors.qualitative.Alphabet
    out = {}
    for cid in category_ids:
        hex_colour = palette[(int(cid) - 1) % len(palette)].lstrip("#")
        out[int(cid)] = tuple(int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))
    return out


def label_image(masks: dict[int, np.ndarray], shape, colours: dict[int, tuple]) -> np.ndarray:
    rgb = np.zeros((*shape, 3), dtype=np.uint8)
    for cid, mask in sorted(masks.items()):
        rgb[mask] = colours.get(cid, STAGE1_RGB)
    return rgb


def thumbnails(gray: np.ndarray, truth: dict, predicted: dict, colours: dict, thumb_px: int) -> list[str]:
    """<img> tags: frame, clean GT, prediction, error overlay."""
    from PIL import Image

    from angioexp.evaluate.overlays import colour_errors

    size = (gray.shape[1], gray.shape[0])
    frame = _fit(Image.fromarray(gray), thumb_px)
    gt = _fit(Image.fromarray(label_image(truth, gray.shape, colours)), thumb_px)
    pred = _fit(Image.fromarray(label_image(predicted, gray.shape, colours)), thumb_px)
    errors = _fit(Image.fromarray(colour_errors(gray, truth, predicted)), thumb_px)
    return [
        _img(_data_uri(frame, "JPEG"), size, thumb_px, "frame"),
        _img(_data_uri(gt, "PNG"), size, thumb_px, "clean ground truth"),
        _img(_data_uri(pred, "PNG"), size, thumb_px, "prediction"),
        _img(_data_uri(errors, "JPEG"), size, thumb_px, "errors"),
    ]


# ---------------------------------------------------------------------------------------------
# Locating the data of a version


def choose_step(client, v: VersionInfo) -> int | None:
    steps = eval_steps(client, v.run_id) if v.run_id else []
    if not steps:
        return None
    if v.metrics_step in steps:
        return v.metrics_step
    return steps[-1]


def coco_split_dir(run) -> tuple[Path | None, str]:
    """(``<coco_dir>/<val split>``, note) of the data a run was evaluated on, if on this machine."""
    from urllib.parse import unquote, urlparse

    split = run.data.params.get("data.val_split", "val")
    candidates = []
    for recorded in (run.data.tags.get("angioexp.coco_dir"), run.data.params.get("data.coco_dir")):
        if recorded and recorded != "None":
            candidates.append(Path(recorded) / split)
    for item in getattr(run.inputs, "dataset_inputs", None) or []:
        if any(t.value == "validation" for t in item.tags or []):
            try:
                uri = json.loads(item.dataset.source).get("uri", "")
            except (json.JSONDecodeError, AttributeError):
                continue
            parsed = urlparse(uri)
            if parsed.scheme in ("file", ""):
                candidates.append(Path(unquote(parsed.path)))
    for folder in candidates:
        if (folder / "annotations.json").is_file():
            return folder, ""
    where = ", ".join(dict.fromkeys(str(c) for c in candidates)) or "none recorded"
    return None, f"the run's COCO data is not on this machine ({where})"


def ground_truth_file(split_dir: Path, run) -> tuple[Path, bool]:
    """Clean labels when the data has them and the run scored against them (its evaluator did)."""
    clean = split_dir / "annotations_gt.json"
    use_clean = str(run.data.params.get("data.use_clean_val_labels", "True")).lower() != "false"
    if use_clean and clean.is_file():
        return clean, True
    return split_dir / "annotations.json", False


def _load_gray(split_dir: Path, image: dict) -> np.ndarray:
    from PIL import Image

    from angioexp.errors import InputError
    from angioexp.fileio import resolve_under

    name = str(image.get("file_name", ""))
    for base, rel in ((split_dir, name), (split_dir / "images", Path(name).name)):
        path = resolve_under(base, rel, file=split_dir, column="file_name")
        if path.is_file():
            with Image.open(path) as handle:
                return np.asarray(handle.convert("L"))
    raise InputError(f"image {image.get('id')}: frame not found", file=split_dir / name)


# ---------------------------------------------------------------------------------------------
# Pages


def load_gallery(client, v: VersionInfo, *, max_images: int) -> tuple[Gallery, dict]:
    """Read what a version's gallery needs; returns (gallery, raw artifacts for rendering)."""
    import pandas as pd

    gallery = Gallery(v, f"{GALLERY_DIR}/{_safe(v.name)}-v{_safe(v.version)}.html")
    raw: dict = {}
    if v.run is None:
        gallery.note = "the version's source run is not in this tracking store"
        return gallery, raw
    gallery.step = choose_step(client, v)
    if gallery.step is None:
        gallery.note = "its source run logged no evaluation artifacts (eval/step_N/)"
        return gallery, raw
    folder = eval_dir(gallery.step)
    text = download_text(client, v.run_id, f"{folder}/per_image.csv")
    if text is None:
        gallery.note = f"no {folder}/per_image.csv in the source run"
        return gallery, raw
    table_ = pd.read_csv(io.StringIO(text))
    table_["_dice_sort"] = pd.to_numeric(table_.get("dice"), errors="coerce")
    table_ = table_.sort_values(["_dice_sort", "image_id"], na_position="last").drop(columns="_dice_sort")
    gallery.per_image = table_.head(max_images).to_dict(orient="records")
    raw["n_images_total"] = len(table_)
    raw["metrics"] = download_json(client, v.run_id, f"{folder}/metrics.json") or {}
    split_dir, note = coco_split_dir(v.run)
    if split_dir is not None:
        predictions = download_json(client, v.run_id, f"{folder}/predictions.json")
        if isinstance(predictions, list):
            raw["split_dir"], raw["predictions"] = split_dir, predictions
            gallery.source = "frames"
            return gallery, raw
        note = f"no {folder}/predictions.json in the source run"
    overlays = [a.path for a in list_artifacts(client, v.run_id, f"{folder}/overlays") if a.path.endswith(".png")]
    if overlays:
        raw["overlays"] = sorted(overlays)[:max_images]
        gallery.source = "overlays"
        gallery.note = f"{note}; showing the overlays the run logged (its worst images)"
    else:
        gallery.note = f"{note}; and the run logged no overlays"
    return gallery, raw


def render_gallery(client, gallery: Gallery, raw: dict, *, thumb_px: int = THUMB_PX) -> Page:
    v = gallery.version
    page = Page(gallery.page_path, f"Predictions: {v.label}",
                f"source run {v.run_name} · evaluation at step {gallery.step}" if gallery.step is not None else "")
    page.add(f"<p>{alias_badges(v.aliases)} {len(gallery.per_image)} of {raw.get('n_images_total', 0)} "
             "validation images, worst Dice first (click a header to sort; hover a thumbnail to enlarge).</p>")
    if gallery.note:
        page.add(f'<p class="warn">{esc(gallery.note)}</p>')
    if not gallery.per_image:
        page.empty(f"Nothing to show for {v.label}: {gallery.note or 'no per-image scores'}.")
        return page
    settings = (raw.get("metrics") or {}).get("settings", {})
    threshold = float(settings.get("score_threshold", v.run.data.params.get("eval.score_threshold", 0.5)))
    columns = ["rank", "case", "Dice", "clDice", "BIoU", "image", "clean GT", "prediction", "errors"]
    if gallery.source == "frames":
        rows, legend, clean = _frame_rows(gallery, raw, threshold, thumb_px)
        if not clean:
            columns[6] = "GT (labels)"
        page.add(legend)
        page.add(table(columns, rows, table_id="gallery"))
    else:
        rows = [_score_cells(rank, r) + ["", "", "", ""] for rank, r in enumerate(gallery.per_image, start=1)]
        page.add(table(columns, rows, table_id="gallery"))
        if raw.get("overlays"):
            page.section("overlays", "Logged overlays (worst first)")
            images = []
            for path in raw["overlays"]:
                data = download_bytes(client, v.run_id, path)
                if data:
                    uri = "data:image/png;base64," + base64.b64encode(_shrink_png(data, thumb_px * 2)).decode("ascii")
                    images.append(f'<figure style="display:inline-block;margin:4px"><img src="{uri}" alt="{esc(path)}">'
                                  f'<figcaption class="note">{esc(Path(path).name)}</figcaption></figure>')
            page.add("".join(images))
    return page


def _shrink_png(data: bytes, max_px: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = _fit(image.convert("RGB"), max_px)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def _score_cells(rank: int, r: dict) -> list:
    """rank, case (with view, image id and instance counts beneath), Dice, clDice, BIoU."""
    angles = [fmt(_num(r.get(k)), 3) for k in ("primary_angle", "secondary_angle")]
    view = r.get("view") if isinstance(r.get("view"), str) else ""
    view_text = " ".join(x for x in (view, f"({angles[0]}°, {angles[1]}°)" if any(angles) else "") if x)
    case = r.get("case_id") if isinstance(r.get("case_id"), str) else f"image {r.get('image_id')}"
    counts = f"GT {fmt(_num(r.get('n_gt')))} · pred {fmt(_num(r.get('n_pred')))}"
    detail = "<br>".join(esc(x) for x in (view_text, f"id {r.get('image_id')} · {counts}") if x)
    return [
        rank, Cell(f"<b>{esc(case)}</b><br><span class='note'>{detail}</span>", case),
        _num(r.get("dice")), _num(r.get("cldice")), _num(r.get("biou")),
    ]


def _frame_rows(gallery: Gallery, raw: dict, threshold: float, thumb_px: int) -> tuple[list, str, bool]:
    """Gallery rows with thumbnails, the legend HTML, and whether the truth shown is the clean one."""
    from angioexp.errors import InputError
    from angioexp.evaluate import load_ground_truth
    from angioexp.evaluate.overlays import FN_RGB, FP_RGB, TP_RGB, WRONG_CATEGORY_RGB
    from angioexp.evaluate.rle import check_rle, decode

    split_dir: Path = raw["split_dir"]
    gt_path, clean = ground_truth_file(split_dir, gallery.version.run)
    data = json.loads(gt_path.read_text(encoding="utf-8"))
    wanted = {int(r["image_id"]) for r in gallery.per_image}
    subset = dict(data, images=[im for im in data["images"] if im["id"] in wanted],
                  annotations=[a for a in data["annotations"] if a["image_id"] in wanted])
    gt = load_ground_truth(subset)
    stage1 = not gt.multi_category
    colours = {cid: STAGE1_RGB for cid in gt.categories} if stage1 else category_colours(gt.categories)
    kept = defaultdict(list)
    for det in raw["predictions"]:
        if isinstance(det, dict) and det.get("image_id") in wanted and (_num(det.get("score")) or 0.0) >= threshold:
            kept[det["image_id"], det["category_id"]].append(det["segmentation"])
    rows = []
    for rank, r in enumerate(gallery.per_image, start=1):
        image_id = int(r["image_id"])
        image = gt.images.get(image_id)
        cells = _score_cells(rank, r)
        if image is None:
            rows.append(cells + [Cell('<span class="warn">not in the ground truth</span>'), "", "", ""])
            continue
        try:
            gray = _load_gray(split_dir, image)
        except Exception as exc:  # noqa: BLE001 - InputError (missing/escaping path): say so in the row
            rows.append(cells + [Cell(f'<span class="warn">{esc(str(exc))[:200]}</span>'), "", "", ""])
            continue
        if gray.shape != (image["height"], image["width"]):
            rows.append(cells + [Cell('<span class="warn">frame size differs from the annotations</span>'), "", "", ""])
            continue
        truth = {cid: gt.union_mask(image_id, cid) for cid in gt.categories if (image_id, cid) in gt.unions}
        try:  # predictions.json is an artifact, not trusted: check every RLE against the frame
            predicted = {
                cid: np.logical_or.reduce([
                    decode(check_rle(rle, image["height"], image["width"], where=f"prediction for image {image_id}",
                                     file="predictions.json")) for rle in kept[image_id, cid]])
                for cid in gt.categories if kept.get((image_id, cid))
            }
        except InputError as exc:
            rows.append(cells + [Cell(f'<span class="warn">{esc(str(exc))[:200]}</span>'), "", "", ""])
            continue
        rows.append(cells + [Cell(t) for t in thumbnails(gray, truth, predicted, colours, thumb_px)])
    label = "clean ground truth (annotations_gt.json)" if clean else "ground truth (annotations.json; no clean labels in this data)"
    legend = f'<p class="note">GT column: {esc(label)}; predictions with score ≥ {threshold:g}. Errors: ' + "".join(
        f'<span class="swatch" style="background:rgb{colour}"></span>{name}'
        for colour, name in ((TP_RGB, "true positive"), (FP_RGB, "false positive"), (FN_RGB, "false negative"),
                             (WRONG_CATEGORY_RGB, "wrong segment"))) + "."
    if not stage1:
        present = sorted({cid for (_, cid) in gt.unions} | {cid for (_, cid) in kept})
        legend += " Segments: " + "".join(
            f'<span class="swatch" style="background:rgb{colours.get(c, (128, 128, 128))}"></span>{esc(gt.slugs.get(c, str(c)))}'
            for c in present)
    return rows, legend + "</p>", clean


def dice_figure(galleries: list[Gallery]):
    """Box + points: per-image Dice of each version (the gallery's images)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for g in galleries:
        values = g.dice_values
        if values:
            fig.add_trace(go.Box(y=values, name=g.version.label, boxpoints="all", jitter=0.4, pointpos=0,
                                 hovertemplate="Dice %{y:.3f}<extra>" + esc(g.version.label) + "</extra>"))
    fig.update_layout(height=380, margin=dict(l=50, r=20, t=50, b=60), showlegend=False,
                      title="Per-image Dice by model version (the gallery's images)", yaxis=dict(title="Dice", range=[-0.02, 1.02]))
    return fig


def choose_versions(versions: list[VersionInfo] | None, max_versions: int) -> list[VersionInfo]:
    """Aliased versions first, then the newest, at most ``max_versions``."""
    versions = versions or []
    chosen = [v for v in versions if v.aliases]
    for v in versions:
        if len(chosen) >= max_versions:
            break
        if v not in chosen:
            chosen.append(v)
    return sorted(chosen[:max(max_versions, len([v for v in versions if v.aliases]))],
                  key=lambda v: (v.name, -int(v.version) if v.version.isdigit() else 0))


def build(client, loaded: dict[str, list[VersionInfo] | None], *, max_versions: int = 5, max_images: int = 50,
          thumb_px: int = THUMB_PX) -> tuple[Page, list[Page]]:
    """predictions.html (versions, per-image Dice) and one gallery page per version."""
    page = Page("predictions.html", "Predictions", "a gallery per model version, worst images first")
    galleries: list[Gallery] = []
    pages: list[Page] = []
    for name, versions in loaded.items():
        for v in choose_versions(versions, max_versions):
            try:
                gallery, raw = load_gallery(client, v, max_images=max_images)
                if gallery.per_image or gallery.note:
                    pages.append(render_gallery(client, gallery, raw, thumb_px=thumb_px))
            except Exception as exc:  # noqa: BLE001 - one broken version must not sink the rest
                log.warning("gallery for %s failed: %s", v.label, exc)
                gallery = Gallery(v, "", note=f"gallery failed: {type(exc).__name__}: {exc}")
            galleries.append(gallery)
    if not galleries:
        page.empty("No registered model version yet, so no gallery. Train and register a model "
                   "(mlflow run . -e train -P stage=1).")
        return page, pages
    if any(g.dice_values for g in galleries):
        page.section("dice", "Per-image Dice")
        page.figure(dice_figure(galleries), "fig-dice")
    page.section("galleries", "Galleries")
    rows = []
    for g in galleries:
        dice = g.dice_values
        link = Cell(f'<a href="{esc(g.page_path)}">open gallery</a>') if g.page_path else ""
        rows.append([
            Cell(f"<b>{esc(g.version.label)}</b>", g.version.label), Cell(alias_badges(g.version.aliases)),
            g.version.run_name, g.step, len(g.per_image),
            float(np.mean(dice)) if dice else None, float(np.min(dice)) if dice else None,
            {"frames": "frames + masks", "overlays": "logged overlays"}.get(g.source, "—"), link,
            Cell(f'<span class="warn">{esc(g.note)}</span>' if g.note else ""),
        ])
    page.add(table(["version", "aliases", "source run", "eval step", "images", "mean Dice", "worst Dice", "shows",
                    "gallery", "note"], rows, table_id="galleries"))
    return page, pages
