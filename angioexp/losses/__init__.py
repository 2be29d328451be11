"""SAM3's matcher and loss terms, re-implemented with SAM3's names and semantics (docs/design.md#loss-terms).

Data contract (the same packed layout as ``sam3.train.loss``, so that our terms can be compared
to SAM3's on identical tensors). A *find query* is one (image, prompt) pair; B find queries per
batch, Q object queries per find query, N instances in total over the batch.

outputs (dict, from the model; one dict per decoder layer in ``aux_outputs``):
    pred_logits         (B, Q, 1)   object score logits
    pred_boxes          (B, Q, 4)   boxes, normalised cx, cy, w, h in [0, 1]
    pred_boxes_xyxy     (B, Q, 4)   the same boxes as normalised x0, y0, x1, y1
                                    (optional: derived from pred_boxes when absent)
    pred_masks          (B, Q, h, w) instance-mask logits (h, w ≥ input/2)
    presence_logit_dec  (B, 1)      "is the prompted concept in this image at all?"
    semantic_seg        (B, 1, h, w) semantic (union) mask logits for the prompted concept
    presence_logit      (B, 1)      optional: the semantic head's own presence logit (SAM3's
                                    key; only read when loss.semantic.presence_loss is on)
    view_logits         (I, V)      auxiliary C-arm view classification, one row per image
    aux_outputs         list[dict]  pred_logits, pred_boxes, pred_boxes_xyxy, presence_logit_dec
                                    (pred_masks allowed, not supervised: SAM3's Masks has
                                    compute_aux=False) for each earlier decoder layer
    *_o2m               optional, SAM3's one-to-many queries (DAC-DETR): pred_logits_o2m
                                    (B, Q', 1), pred_boxes_o2m, pred_boxes_xyxy_o2m,
                                    pred_masks_o2m, in the final dict and/or aux dicts. Required
                                    when o2m.enabled; supervised with the o2m matcher.
    indices             optional: a precomputed matcher triple (SAM3's model matches itself);
                                    computed by the criterion when absent.

targets (dict, packed over the batch):
    boxes               (N, 4)      cx, cy, w, h normalised
    boxes_xyxy          (N, 4)      (optional: derived from boxes when absent)
    num_boxes           (B,)  long  instances per find query (0 for an absent concept)
    masks               (N, H, W)   bool instance masks (any resolution; see loss.masks.resize)
    is_valid_mask       (N,)  bool  optional: instances without a usable mask
    semantic_masks      (B, H, W)   bool union of each find query's instance masks
                                    (optional: built from masks + num_boxes when absent)
    view_labels         (I,)  long  view class per image (-1 = unknown, ignored)

indices (from the matcher): (batch_idx (M,), src_idx (M,), tgt_idx (M,)) — prediction
``outputs[..][batch_idx, src_idx]`` is matched to packed target ``tgt_idx``.

criterion(outputs, targets) → dict of scalar tensors: every unweighted term under SAM3's name
(loss_bbox, loss_giou, loss_ce, presence_loss, loss_mask, loss_dice, loss_semantic_seg,
loss_semantic_dice, loss_semantic_presence, loss_view), aux layers suffixed ``_aux_{i}``
(SAM3's spelling), one-to-many terms suffixed ``_o2m``, and ``"loss"`` = the weighted total.
"""

from angioexp.losses.criterion import Sam3Criterion, build_criterion
from angioexp.losses.loss_fns import Boxes, IABCEMdetr, Masks, SemanticSegCriterion, ViewCriterion
from angioexp.losses.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

__all__ = [
    "BinaryHungarianMatcherV2",
    "BinaryOneToManyMatcher",
    "Boxes",
    "IABCEMdetr",
    "Masks",
    "Sam3Criterion",
    "SemanticSegCriterion",
    "ViewCriterion",
    "build_criterion",
]
