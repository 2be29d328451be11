"""COCO split → training / evaluation batches of find queries with packed targets.

A *find query* is one (image, category prompt) pair (SAM3). Per training image:

* Stage 1: one query, "coronary artery" — positive, or negative when the image (crop) has no
  vessel;
* Stage 2: up to ``prompts.positives_per_image`` categories present in the image plus
  ``prompts.negatives_per_image`` absent ones (these teach the presence token to say "no").

Each query carries its text prompt (``prompts.use_text``), ``num_points ∈ [lo, hi]`` positive
points along the centreline of its target (+ ``num_negative_points``), and with probability
``box_chance`` a box from its mask (SAM3's RandomGeometricInputsAPI). Augmentation: a random
``scratch.crop_size`` crop at the working resolution (native-resolution crops keep 2–8 px
vessels sharp, where a resized whole image would blur them), and a horizontal flip with
probability ``scratch.hflip_prob`` — a mirrored image no longer shows its recorded C-arm view, so
its view becomes "unknown"; 0 in Stage 2 and refused there (angioexp.config), where "left"/"right"
segment names would be mirrored too.

Randomness is keyed by (seed, step, slot): the batch of step s is the same whether the run
started at 0 or resumed at s, and on whichever DDP rank it is built.

Targets follow the contract in :mod:`angioexp.losses` (packed over the batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from angioexp.data.coco import CocoSplit
from angioexp.errors import InputError
from angioexp.model.core import FindQueries
from angioexp.model.prompt_encoder import PromptTokenizer
from angioexp.model.view import view_index

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# In-memory dataset at the working resolution


@dataclass
class Instance:
    """One instance mask stored as its bounding-box crop (thin segments are small)."""

    category_id: int
    y0: int
    x0: int
    mask: np.ndarray  # bool (h, w), the bbox crop

    def paste(self, size: int) -> np.ndarray:
        full = np.zeros((size, size), dtype=bool)
        h, w = self.mask.shape
        full[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.mask
        return full


@dataclass
class Sample:
    image_id: int
    pixels: np.ndarray  # uint8 (S, S)
    view: int  # view class; num_views = unknown
    instances: list[Instance] = field(default_factory=list)

    def categories(self) -> set[int]:
        return {inst.category_id for inst in self.instances}


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (H, W) → bool (size, size): area-average, then threshold at 0.5 (no shift, and thin
    vessels keep their centre line)."""
    if mask.shape == (size, size):
        return mask
    h, w = mask.shape
    if h % size or w % size:
        soft = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BOX)
        return np.asarray(soft) >= 0.5
    # A whole-number factor: the same box average as counts over the blocks of the mask's
    # bounding box only (a vessel covers a few % of the frame) — Stage 2 loads ~18 masks per frame.
    fy, fx = h // size, w // size
    out = np.zeros((size, size), dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0] // fy, rows[-1] // fy + 1, cols[0] // fx, cols[-1] // fx + 1
    block = mask[y0 * fy : y1 * fy, x0 * fx : x1 * fx].astype(np.uint8)
    counts = block.reshape(y1 - y0, fy, x1 - x0, fx).sum(axis=(1, 3), dtype=np.int32)
    out[y0:y1, x0:x1] = 2 * counts >= fy * fx
    return out


def _as_instance(category_id: int, mask: np.ndarray) -> Instance | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return Instance(category_id, int(y0), int(x0), mask[y0:y1, x0:x1].copy())


def load_samples(split: CocoSplit, size: int, num_views: int, with_instances: bool = True) -> list[Sample]:
    """Decode every image (and instance mask) of a split at ``size``×``size``."""
    samples = []
    for record in split.images:
        pixels = _resize_image(split.image(record.id), size)
        view = view_index(record.primary_angle, record.secondary_angle, num_views)
        sample = Sample(record.id, pixels, view)
        if with_instances:
            for category_id, mask in split.instances(record.id):
                inst = _as_instance(category_id, _resize_mask(mask, size))
                if inst is not None:
                    sample.instances.append(inst)
        samples.append(sample)
    return samples


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """I images, B find queries, N target instances (see angioexp.losses for targets)."""

    images: torch.Tensor  # (I, 1, S, S) uint8
    queries: FindQueries
    targets: dict[str, torch.Tensor]
    image_ids: list[int]  # (I) COCO image ids
    category_ids: list[int]  # (B) category of each find query

    def to(self, device) -> "Batch":
        return Batch(
            self.images.to(device, non_blocking=True),
            self.queries.to(device),
            {k: v.to(device, non_blocking=True) for k, v in self.targets.items()},
            self.image_ids,
            self.category_ids,
        )


@dataclass
class _Query:
    image_slot: int
    category_id: int
    instances: list[np.ndarray]  # bool (s, s) each, in crop coordinates
    points: list[tuple[float, float, int]]  # (x, y, label) normalised
    box: tuple[float, float, float, float] | None  # normalised xyxy


def segment_label_map(instances: list[tuple[int, np.ndarray]], category_ids: list[int], shape) -> np.ndarray:
    """[(category_id, bool mask)] → int64 (H, W): 0 background, k = category_ids[k - 1].

    Where two segments overlap (a crossing in projection) the later one in ``instances`` wins;
    a category outside ``category_ids`` is an error (the softmax has no class for it)."""
    index = {c: k + 1 for k, c in enumerate(category_ids)}
    label = np.zeros(shape, dtype=np.int64)
    for category_id, mask in instances:
        if category_id not in index:
            raise InputError(f"segment label {category_id} is not among the categories {sorted(index)}")
        label[mask] = index[category_id]
    return label


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """bool (H, W) → normalised (x0, y0, x1, y1) of its pixel extent (edges, not centres)."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def collate(
    images: list[np.ndarray],
    views: list[int],
    queries: list[_Query],
    tokenizer: PromptTokenizer,
    prompts_by_category: dict[int, str],
    *,
    use_text: bool,
    num_views: int,
    image_ids: list[int],
) -> Batch:
    """Pack images, prompts and targets into tensors."""
    size = images[0].shape[-1]
    b = len(queries)
    texts = [prompts_by_category[q.category_id] if use_text else "" for q in queries]
    text_ids = tokenizer.batch(texts) if use_text else torch.zeros((b, 1), dtype=torch.long)
    p = max((len(q.points) for q in queries), default=0)
    point_coords = torch.zeros((b, p, 2))
    point_labels = torch.full((b, p), -1, dtype=torch.long)
    k = 1 if any(q.box is not None for q in queries) else 0
    boxes = torch.zeros((b, k, 4))
    box_valid = torch.zeros((b, k), dtype=torch.bool)
    for i, q in enumerate(queries):
        for j, (x, y, label) in enumerate(q.points):
            point_coords[i, j] = torch.tensor([x, y])
            point_labels[i, j] = label
        if q.box is not None:
            boxes[i, 0] = torch.tensor(q.box)
            box_valid[i, 0] = True

    masks = [m for q in queries for m in q.instances]
    if masks:
        mask_t = torch.from_numpy(np.stack(masks))
        xyxy = torch.tensor([mask_box(m) for m in masks], dtype=torch.float32)
    else:
        mask_t = torch.zeros((0, size, size), dtype=torch.bool)
        xyxy = torch.zeros((0, 4))
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    semantic = torch.zeros((b, size, size), dtype=torch.bool)
    for i, q in enumerate(queries):
        for m in q.instances:
            semantic[i] |= torch.from_numpy(m)
    view_t = torch.tensor(views, dtype=torch.long)
    targets = {
        "boxes": cxcywh,
        "boxes_xyxy": xyxy,
        "num_boxes": torch.tensor([len(q.instances) for q in queries], dtype=torch.long),
        "masks": mask_t,
        "semantic_masks": semantic,
        "view_labels": torch.where(view_t >= num_views, torch.full_like(view_t, -1), view_t),
    }
    find = FindQueries(
        img_idx=torch.tensor([q.image_slot for q in queries], dtype=torch.long),
        text_ids=text_ids,
        point_coords=point_coords,
        point_labels=point_labels,
        boxes=boxes,
        box_valid=box_valid,
        views=view_t,
    )
    return Batch(torch.from_numpy(np.stack(images)[:, None]), find, targets, image_ids, [q.category_id for q in queries])


def geometric_prompt(mask: np.ndarray, prompts_cfg, rng: np.random.Generator, *, always_box: bool = False):
    """Points and box for one query from its target ``mask`` (SAM3's RandomGeometricInputsAPI
    via :func:`angioexp.prompts.sample_geometric_prompt`). Returns ([(x, y, label)], box | None),
    normalised to [0, 1]."""
    from angioexp.prompts import box_from_mask, sample_geometric_prompt

    h, w = mask.shape
    if prompts_cfg.num_points[1] == 0 and prompts_cfg.box_chance == 0 and not always_box:
        return [], None
    prompt = sample_geometric_prompt(mask, prompts_cfg, rng)
    points = [(float(x) / w, float(y) / h, int(label)) for (x, y), label in zip(prompt.points, prompt.labels)]
    box = prompt.box
    if box is None and always_box:
        box = box_from_mask(mask)
    if box is not None:
        box = (float(box[0]) / w, float(box[1]) / h, float(box[2]) / w, float(box[3]) / h)
    return points, box


class TrainingSet:
    """Random, step-keyed batches of find queries from one split (training labels)."""

    def __init__(self, coco_dir: str | Path, cfg, *, split: str | None = None, num_views: int):
        self.cfg = cfg
        self.split = CocoSplit.load(coco_dir, split or cfg.data.train_split, gt=False)
        if len(self.split) == 0:
            raise InputError("the training split has no images", file=self.split.annotations_path)
        self.size = cfg.scratch.resolution
        self.crop = cfg.scratch.crop_size if cfg.scratch.crop_size and cfg.scratch.crop_size < self.size else None
        self.num_views = num_views
        self.samples = load_samples(self.split, self.size, num_views)
        self.category_ids = list(self.split.category_ids)
        self.prompts = {c["id"]: str(c.get("prompt") or c["name"]).replace("_", " ") for c in self.split.categories}
        self.tokenizer = PromptTokenizer()
        # Stage 2 with the segment-identity head: every step scores all prompts of the set at once.
        self.identity = bool(cfg.model.identity_head) and cfg.backend == "core"
        self.class_text_ids = self.tokenizer.batch([self.prompts[c] for c in self.category_ids])
        self._order_epoch, self._order = -1, np.arange(0)
        n_empty = sum(1 for s in self.samples if not s.instances)
        if n_empty:
            log.info("%d of %d training images have no annotations (negative queries)", n_empty, len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def image_order(self, epoch: int) -> np.ndarray:
        """The image order of one epoch (a function of seed and epoch only): a permutation, or
        with ``data.rare_segment_power`` a draw weighted towards frames with rare segments."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.cfg.seed, 1, epoch])
            weights = self.frame_weights()
            if weights is None:
                self._order = rng.permutation(len(self.samples))
            else:
                self._order = rng.choice(len(self.samples), size=len(self.samples), replace=True, p=weights)
            self._order_epoch = epoch
        return self._order

    def frame_weights(self) -> np.ndarray | None:
        """Sampling probability per frame ∝ max over its categories of (1 / frequency)^power."""
        power = self.cfg.data.rare_segment_power
        if not power or self.cfg.stage != 2:
            return None
        present = [s.categories() for s in self.samples]
        counts: dict[int, int] = {}
        for cats in present:
            for c in cats:
                counts[c] = counts.get(c, 0) + 1
        n = len(self.samples)
        rarity = {c: (n / k) ** power for c, k in counts.items()}
        weights = np.array([max((rarity[c] for c in cats), default=1.0) for cats in present])
        return weights / weights.sum()

    def indices_for_step(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        """Image indices of this rank's share of the global batch at ``step`` (epoch-wise shuffling)."""
        n = len(self.samples)
        start = (step * world + rank) * batch_size
        out = []
        for pos in range(start, start + batch_size):
            epoch, offset = divmod(pos, n)
            out.append(int(self.image_order(epoch)[offset]))
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        bs = self.cfg.scratch.train_batch_size
        indices = self.indices_for_step(step, bs, rank, world)
        images, views, queries, image_ids, label_maps = [], [], [], [], []
        for slot, index in enumerate(indices):
            rng = np.random.default_rng([self.cfg.seed, 2, step, rank * bs + slot])
            pixels, view, crop_instances = self._augment(self.samples[index], rng)
            images.append(pixels)
            views.append(view)
            image_ids.append(self.samples[index].image_id)
            queries.extend(self._queries(slot, crop_instances, rng))
            if self.identity:
                label_maps.append(segment_label_map(crop_instances, self.category_ids, pixels.shape))
        batch = collate(
            images, views, queries, self.tokenizer, self.prompts,
            use_text=self.cfg.prompts.use_text, num_views=self.num_views, image_ids=image_ids,
        )
        if self.identity:
            labels = torch.from_numpy(np.stack(label_maps))
            batch.queries.class_text_ids = self.class_text_ids
            batch.targets["segment_labels"] = labels
            present = torch.zeros((len(label_maps), len(self.category_ids)), dtype=torch.float32)
            for i, label in enumerate(label_maps):
                found = np.unique(label)
                present[i, found[found > 0] - 1] = 1.0
            batch.targets["segment_present"] = present
        return batch

    def _augment(self, sample: Sample, rng: np.random.Generator):
        """Crop + flip. Returns pixels (s, s), view, [(category_id, bool (s, s))] (non-empty only)."""
        size = self.size
        s = self.crop or size
        y0 = int(rng.integers(0, size - s + 1)) if self.crop else 0
        x0 = int(rng.integers(0, size - s + 1)) if self.crop else 0
        # Stage 2 names sides: its hflip_prob is 0 (angioexp.config refuses more); it draws no flip
        # at all, which keeps its random stream (crops, prompts) as it always was
        flip = self.cfg.stage == 1 and rng.random() < self.cfg.scratch.hflip_prob
        pixels = sample.pixels[y0 : y0 + s, x0 : x0 + s]
        instances = []
        for inst in sample.instances:
            # Intersect the instance's bbox crop with the window, without pasting to full size.
            h, w = inst.mask.shape
            ty0, tx0 = max(inst.y0, y0), max(inst.x0, x0)
            ty1, tx1 = min(inst.y0 + h, y0 + s), min(inst.x0 + w, x0 + s)
            if ty0 >= ty1 or tx0 >= tx1:
                continue
            part = inst.mask[ty0 - inst.y0 : ty1 - inst.y0, tx0 - inst.x0 : tx1 - inst.x0]
            if not part.any():
                continue
            full = np.zeros((s, s), dtype=bool)
            full[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = part
            instances.append((inst.category_id, full))
        view = sample.view
        if flip:
            pixels = pixels[:, ::-1]
            instances = [(c, m[:, ::-1]) for c, m in instances]
            view = self.num_views  # a mirrored image shows no real C-arm view
        return np.ascontiguousarray(pixels), view, [(c, np.ascontiguousarray(m)) for c, m in instances]

    def _queries(self, slot: int, instances: list[tuple[int, np.ndarray]], rng: np.random.Generator) -> list[_Query]:
        if not self.cfg.loss.per_prompt:
            return []
        pc = self.cfg.prompts
        by_cat: dict[int, list[np.ndarray]] = {}
        for category_id, mask in instances:
            by_cat.setdefault(category_id, []).append(mask)
        present = sorted(by_cat)
        if pc.positives_per_image is not None and len(present) > pc.positives_per_image:
            present = sorted(rng.choice(present, size=pc.positives_per_image, replace=False).tolist())
        absent = [c for c in self.category_ids if c not in by_cat]
        n_neg = min(pc.negatives_per_image, len(absent))
        negatives = sorted(rng.choice(absent, size=n_neg, replace=False).tolist()) if n_neg else []
        if not present and not negatives:
            # Stage 1 image (crop) without vessels: still one (negative) query, so the presence
            # token learns that an empty frame is empty.
            negatives = [self.category_ids[0]]
        out = []
        for category_id in present:
            masks = by_cat[category_id]
            union = np.logical_or.reduce(masks)
            points, box = geometric_prompt(union, pc, rng)
            out.append(_Query(slot, int(category_id), masks, points, box))
        for category_id in negatives:
            out.append(_Query(slot, int(category_id), [], [], None))
        return out


class EvalSet:
    """Whole images at the working resolution, one text query per (image, category)."""

    def __init__(self, coco_dir: str | Path, cfg, split: str, *, num_views: int, image_ids: list[int] | None = None, categories: list[dict] | None = None):
        self.cfg = cfg
        self.split = CocoSplit.load(coco_dir, split, gt=False)
        self.size = cfg.scratch.resolution
        self.num_views = num_views
        self.tokenizer = PromptTokenizer()
        categories = categories or self.split.categories
        self.category_ids = [c["id"] for c in categories]
        self.prompts = {c["id"]: str(c.get("prompt") or c["name"]).replace("_", " ") for c in categories}
        wanted = set(image_ids) if image_ids is not None else None
        self.records = [r for r in self.split.images if wanted is None or r.id in wanted]
        # Geometric prompts at evaluation only when text is off: then points/boxes from the mask.
        self.geometric = not cfg.prompts.use_text

    def __len__(self) -> int:
        return len(self.records)

    def batches(self, batch_size: int, max_queries: int = 32, with_queries: bool = True):
        """Yield (Batch, original sizes [(H, W)]) over all images, in order.

        Images per batch: ``batch_size``, fewer when the categories are many (Stage 2 asks 26
        queries per image, each with full-resolution mask logits for Q object queries).
        ``with_queries=False``: images and views only (the identity head asks every prompt at once).
        """
        pc = self.cfg.prompts
        if with_queries:
            batch_size = max(1, min(batch_size, max_queries // max(1, len(self.category_ids))))
        for start in range(0, len(self.records), batch_size):
            records = self.records[start : start + batch_size]
            images, views, queries, sizes = [], [], [], []
            for slot, record in enumerate(records):
                images.append(_resize_image(self.split.image(record.id), self.size))
                views.append(view_index(record.primary_angle, record.secondary_angle, self.num_views))
                sizes.append((record.height, record.width))
                by_cat: dict[int, list[np.ndarray]] = {}
                if self.geometric:
                    for category_id, mask in self.split.instances(record.id):
                        by_cat.setdefault(category_id, []).append(_resize_mask(mask, self.size))
                for category_id in self.category_ids if with_queries else ():
                    points, box = [], None
                    if self.geometric and category_id in by_cat:
                        rng = np.random.default_rng([self.cfg.seed, 3, record.id, category_id])
                        union = np.logical_or.reduce(by_cat[category_id])
                        points, box = geometric_prompt(union, pc, rng)
                    queries.append(_Query(slot, category_id, [], points, box))
            batch = collate(
                images, views, queries, self.tokenizer, self.prompts,
                use_text=self.cfg.prompts.use_text, num_views=self.num_views, image_ids=[r.id for r in records],
            )
            yield batch, sizes
