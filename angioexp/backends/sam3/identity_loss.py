"""``PromptIdentityLoss``: the Stage 2 segment-identity objective on SAM3's semantic head.

SAM3 asks one find query per (image, category) — every category of the image, absent ones
included (``COCO_FROM_JSON include_negatives``) — and its segmentation head gives each query one
semantic logit map (``outputs["semantic_seg"]``, (Q, 1, h, w)). ``SemanticSegCriterion`` trains
each map on its own, as a sigmoid ("is this pixel the prompted segment?"): nothing stops two
prompts from claiming the same pixel. This term stacks, per image, the maps of all its queries
behind a background logit and takes one per-pixel softmax across them, then applies the core's
identity objective (:func:`angioexp.losses.identity.identity_ce_dice`: class-weighted
cross-entropy + per-segment soft Dice) — so each pixel belongs to one segment.

Background logit: fixed 0. With one prompt the softmax over {0, s} is sigmoid(s), the semantic
head's own probability, so the term keeps the decision boundary that SemanticSegCriterion trains
and SAM3's postprocessor thresholds (sigmoid 0.5); a learned background would add a tensor that
plain SAM3 checkpoints lack and shift that boundary.

    In:  outputs["semantic_seg"]  (Q, 1, h, w) one logit map per find query
         outputs["img_ids"]       (Q,) the image of each query (Sam3ImageWithPoints adds it)
         targets["masks"], targets["num_boxes"] (packed instance masks, count per query), or
         targets["semantic_masks"] (Q, H, W) when the collator gives them — as SemanticSegCriterion
    Out: loss_identity_ce, loss_identity_dice; weighted by ``weight_dict`` into SAM3's core loss

The class of a pixel is the query whose (union) target covers it, the later query where two
overlap (a crossing in projection), as in the core's label maps. Images of a batch may have
different numbers of queries: missing classes get -inf logits (probability 0, no gradient).
Non-finite logits are not masked: the loss turns non-finite and ``GuardedTrainer`` skips the step.
It lives in ``loss_fns_find``: auxiliary decoder layers and the one-to-many queries carry no
semantic map, so it adds nothing there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam3.train.loss.loss_fns import CORE_LOSS_KEY, LossWithWeights

from angioexp.losses.identity import identity_ce_dice
from angioexp.losses.loss_fns import _check_weights

TERMS = ("loss_identity_ce", "loss_identity_dice")


class PromptIdentityLoss(LossWithWeights):
    """One softmax over {background, every query of the image} on SAM3's semantic logits.

    Args:
        weight_dict: ``loss_identity_ce`` / ``loss_identity_dice`` weights (angioexp ``loss.identity.*``).
        class_weight_power: class weight ∝ pixel frequency^-power within the batch.
        downsample: as ``SemanticSegCriterion``: True resizes the targets to the logits
            (bilinear, then any coverage counts), False upsamples the logits to the targets.
    """

    def __init__(self, weight_dict: dict[str, float], class_weight_power: float = 0.5, downsample: bool = False):
        super().__init__(_check_weights("PromptIdentityLoss", weight_dict, TERMS), compute_aux=False,
                         supports_o2m_loss=False)
        self.class_weight_power = class_weight_power
        self.downsample = downsample

    def forward(self, *args, is_aux: bool = False, **kwargs):
        outputs = kwargs.get("outputs", args[0] if args else None)
        if not is_aux and "semantic_seg" not in outputs:  # Sam3LossWrapper's one-to-many pass
            return {CORE_LOSS_KEY: 0.0}
        return super().forward(*args, is_aux=is_aux, **kwargs)

    def get_loss(self, outputs: dict, targets: dict, **_) -> dict[str, torch.Tensor]:
        logits, labels = stack_prompt_logits(outputs, targets, downsample=self.downsample)
        ce, dice = identity_ce_dice(logits, labels, self.class_weight_power)
        return {"loss_identity_ce": ce, "loss_identity_dice": dice}


def query_truth(targets: dict, num_queries: int, size: tuple[int, int], device) -> torch.Tensor:
    """bool (Q, H, W): the union of each query's target masks (SemanticSegCriterion's targets)."""
    semantic = targets.get("semantic_masks")
    if semantic is not None and semantic.size(0) > 0:
        return semantic.bool().to(device)
    counts = targets["num_boxes"]
    if int(counts.sum()) == 0:  # an all-negative batch: SAM3 gives no masks at all
        return torch.zeros((num_queries, *size), dtype=torch.bool, device=device)
    masks = targets["masks"].bool().to(device)
    return torch.stack([m.any(dim=0) for m in torch.split(masks, counts.tolist())])


def stack_prompt_logits(outputs: dict, targets: dict, downsample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (I, 1 + K, H, W), labels (I, H, W)) for the per-pixel softmax of each image.

    K is the largest number of queries of one image; class k of image i is its k-th query (in
    batch order), class 0 the background (logit 0)."""
    seg = outputs["semantic_seg"]
    img_ids = outputs.get("img_ids")
    if img_ids is None:
        raise ValueError("PromptIdentityLoss needs outputs['img_ids'] (the image of each find query), "
                         "which angioexp's Sam3ImageWithPoints adds")
    if seg.dim() != 4 or seg.shape[1] != 1 or img_ids.numel() != seg.shape[0]:
        raise ValueError(f"semantic_seg (Q, 1, h, w) and img_ids (Q,) disagree: {tuple(seg.shape)} vs {tuple(img_ids.shape)}")
    seg = seg.float()
    truth = query_truth(targets, seg.shape[0], tuple(seg.shape[-2:]), seg.device)
    if truth.shape[-2:] != seg.shape[-2:]:
        if downsample:
            truth = F.interpolate(truth[:, None].float(), size=seg.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0] > 0
        else:  # before stacking: a bilinear upsample of -inf padding would give NaN
            seg = F.interpolate(seg, size=truth.shape[-2:], mode="bilinear", align_corners=False)

    images, image_of_query = torch.unique(img_ids.to(seg.device), return_inverse=True)
    slot = torch.zeros_like(image_of_query)  # 1-based position of each query within its image
    seen = torch.zeros(len(images), dtype=torch.long, device=seg.device)
    for q, i in enumerate(image_of_query.tolist()):
        seen[i] += 1
        slot[q] = seen[i]
    num_images, height, width = len(images), *seg.shape[-2:]
    logits = torch.full((num_images, 1 + int(seen.max()), height, width), float("-inf"), device=seg.device)
    logits[:, 0] = 0.0  # background
    logits = logits.index_put((image_of_query, slot), seg[:, 0])
    labels = torch.zeros((num_images, height, width), dtype=torch.long, device=seg.device)
    for q in range(seg.shape[0]):  # later queries win where targets overlap
        labels[image_of_query[q]][truth[q]] = slot[q]
    return logits, labels
