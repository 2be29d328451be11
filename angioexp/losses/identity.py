"""``SegmentIdentityLoss``: the dense Stage 2 objective of :mod:`angioexp.model.identity`.

    In:  outputs["identity_logits"] (I, 1 + C, H, W), class 0 = background
         outputs["identity_presence"] (I, C) presence logits
         targets["segment_labels"] (I, H, W) long: 0 background, k = prompt k - 1 of the class
             list, -1 = ignore
         targets["segment_present"] (I, C) float 0/1
    Out: loss_identity_ce        class-weighted cross-entropy over all pixels of the batch
         loss_identity_dice      1 - soft Dice, mean over the (image, segment) pairs in the truth
         loss_identity_presence  binary cross-entropy of the presence logits

Class weights: a segment covers ~0.1-1 % of a frame and background ~90 %; plain cross-entropy
would learn "background" and the large proximal segments. Weight ∝ frequency^-power within the
batch (power 0.5 by default), normalised so that a pixel weighs 1 on average: the loss keeps the
scale of plain cross-entropy whatever the class mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from angioexp.losses.loss_fns import _check_weights


class SegmentIdentityLoss(nn.Module):
    TERMS = ("loss_identity_ce", "loss_identity_dice", "loss_identity_presence")

    def __init__(self, weight_dict: dict[str, float] | None = None, class_weight_power: float = 0.5):
        super().__init__()
        self.weight_dict = _check_weights("SegmentIdentityLoss", weight_dict, self.TERMS)
        self.class_weight_power = class_weight_power
        self.compute_aux = False

    def class_weights(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return class_weights(labels, num_classes, self.class_weight_power)

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        logits = outputs["identity_logits"].float()
        labels = targets["segment_labels"].long().to(logits.device)
        if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"identity_logits (I, K, H, W) and segment_labels (I, H, W) disagree: "
                             f"{tuple(logits.shape)} vs {tuple(labels.shape)}")
        if labels.shape[-2:] != logits.shape[-2:]:
            labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        ce, dice = identity_ce_dice(logits, labels, self.class_weight_power)

        presence_logits = outputs["identity_presence"].float()
        presence_target = targets["segment_present"].float().to(logits.device)
        presence = F.binary_cross_entropy_with_logits(presence_logits, presence_target)
        return {"loss_identity_ce": ce, "loss_identity_dice": dice, "loss_identity_presence": presence}


def class_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor:
    """(num_classes,) weights ∝ frequency^-power over the labelled pixels, pixel mean 1."""
    counts = torch.bincount(labels[labels >= 0].flatten(), minlength=num_classes).float()
    freq = counts / counts.sum().clamp(min=1)
    weights = (freq + 1e-6).pow(-power)
    return weights / (freq * weights).sum().clamp(min=1e-12)


def identity_ce_dice(logits: torch.Tensor, labels: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-weighted cross-entropy, 1 - soft Dice) of one per-pixel softmax over 1 + C classes.

    logits (I, 1 + C, H, W), class 0 = background; labels (I, H, W) long at the same size, -1 =
    ignore. Dice is averaged over the (image, class) pairs present in the truth. A class may be
    absent from an image's softmax: its logits are -inf there (probability 0, no gradient). Used by
    :class:`SegmentIdentityLoss` and the sam3 backend's ``PromptIdentityLoss``."""
    k = logits.shape[1]
    if int(labels.max()) >= k:
        raise ValueError(f"segment label {int(labels.max())} out of range for {k - 1} prompts + background")
    log_probs = logits.log_softmax(dim=1)
    ce = F.nll_loss(log_probs, labels, weight=class_weights(labels, k, power), ignore_index=-1)

    # Soft Dice per (image, class) without a (I, C, H, W) one-hot: the overlap is each pixel's
    # probability of its own label, summed per label (gather + scatter instead of three products).
    probs = log_probs.exp()
    valid = labels >= 0
    own = labels.clamp(min=0)
    at_label = probs.gather(1, own[:, None])[:, 0] * valid  # (I, H, W)
    inter = torch.zeros(labels.shape[0], k, device=logits.device).scatter_add_(1, own.flatten(1), at_label.flatten(1))
    truth_sizes = torch.zeros_like(inter).scatter_add_(1, own.flatten(1), valid.flatten(1).float())
    predicted_sizes = torch.einsum("ikp,ip->ik", probs.flatten(2), valid.flatten(1).float())
    inter, sizes, present = inter[:, 1:], predicted_sizes[:, 1:] + truth_sizes[:, 1:], truth_sizes[:, 1:] > 0
    dice_loss = 1 - (2 * inter + 1) / (sizes + 1)
    # no segment in the truth: 0, still attached to the graph (probs: finite where logits are -inf)
    dice = dice_loss[present].mean() if bool(present.any()) else probs.sum() * 0.0
    return ce, dice
