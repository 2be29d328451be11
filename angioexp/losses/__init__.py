"""SAM3's matcher and loss terms, re-implemented with SAM3's names and semantics (DESIGN §4).

Data contract (the same packed layout as ``sam3.train.loss``, so that our terms can be compared
to SAM3's on identical tensors). A *find query* is one (image, prompt) pair; B find queries per
batch, Q object queries per find query, N instances in total over the batch.

outputs (dict, from the model; one dict per decoder layer in ``aux_outputs``):
    pred_logits         (B, Q, 1)   object score logits
    pred_boxes          (B, Q, 4)   boxes, normalised cx, cy, w, h in [0, 1]
    pred_boxes_xyxy     (B, Q, 4)   the same boxes as normalised x0, y0, x1, y1
    pred_masks          (B, Q, h, w) instance-mask logits (h, w ≥ input/2)
    presence_logit_dec  (B, 1)      "is the prompted concept in this image at all?"
    semantic_seg        (B, 1, h, w) semantic (union) mask logits for the prompted concept
    view_logits         (I, V)      auxiliary C-arm view classification, one row per image
    aux_outputs         list[dict]  the first five keys for each earlier decoder layer

targets (dict, packed over the batch):
    boxes               (N, 4)      cx, cy, w, h normalised
    boxes_xyxy          (N, 4)
    num_boxes           (B,)  long  instances per find query (0 for an absent concept)
    masks               (N, H, W)   bool instance masks (any resolution; losses resample)
    semantic_masks      (B, H, W)   bool union of each find query's instance masks
    view_labels         (I,)  long  view class per image (-1 = unknown, ignored)

indices (from the matcher): (batch_idx (M,), src_idx (M,), tgt_idx (M,)) — prediction
``outputs[..][batch_idx, src_idx]`` is matched to packed target ``tgt_idx``.
"""
