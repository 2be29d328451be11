"""SAM3's image model, built so that the angioexp config is what actually trains.

``build_sam3_model`` is the Hydra ``_target_`` of ``trainer.model`` in the generated SAM3
config. It assembles the model from SAM3's own component builders (``sam3.model_builder``)
and changes five things that SAM3's ``build_sam3_image_model`` does silently:

1. **Point prompts reach the geometry encoder.** ``Sam3Image.forward`` prints "Point prompts
   are ignored in PCS" and hands only boxes to the geometry encoder.
   :class:`Sam3ImageWithPoints` passes the points (and their positive/negative labels) too.
2. **The configured matcher drives one-to-one matching.** SAM3's builder hard-codes a
   ``BinaryHungarianMatcherV2(cost_class=2, cost_bbox=5, cost_giou=2)`` on the model; the YAML
   ``scratch.matcher`` only reaches the loss's one-to-many auxiliary matching. Here the model's
   matcher is built from ``matcher.*``, and a non-finite cost becomes a bad step for the NaN
   guard instead of a scipy crash (:mod:`angioexp.backends.sam3.matcher`).
3. **Other resolutions work.** The ViT is built for 1008 px (RoPE tables of 72×72 tokens in its
   four global-attention blocks); feeding 336 px images trips an assertion. The RoPE tables are
   recomputed for ``scratch.resolution`` (a multiple of 336, so 24-token windows tile exactly).
4. **No uninitialised text-encoder weights.** ``TextTransformer`` allocates
   ``positional_embedding`` and ``text_projection`` with ``torch.empty``; a random-weight build
   trains on whatever was in memory. They get CLIP's initialisation (Radford et al. 2021:
   N(0, 0.01²) and N(0, width⁻¹)).
5. **Activation-checkpoint recomputes match their forward.** The text encoder's blocks choose
   their attention kernel inside an ``sdpa_kernel`` block that the backward-pass recompute is
   outside of; on an H100 the two picked different kernels and the first backward raised
   ``CheckpointError``. The blocks now pin SAM3's kernel list themselves, and
   ``activation_checkpointing=False`` switches checkpointing off model-wide
   (:mod:`angioexp.backends.sam3.act_ckpt`).

Weights (vanilla ``sam3.pt``, a trainer checkpoint or a registered model) are loaded with a
verified :class:`~angioexp.checkpoints.LoadReport` (:mod:`angioexp.backends.sam3.weights`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from angioexp.errors import ConfigError

log = logging.getLogger(__name__)

SAM3_NATIVE_RESOLUTION = 1008
PATCH_SIZE = 14
WINDOW_TOKENS = 24  # SAM3's ViT window size; 14 px × 24 = 336 px
RESOLUTION_STEP = PATCH_SIZE * WINDOW_TOKENS


def check_resolution(resolution: int) -> None:
    """SAM3's ViT tiles 24×24-token windows: the token grid must be a multiple of 24."""
    if resolution <= 0 or resolution % RESOLUTION_STEP:
        lower = max(RESOLUTION_STEP, resolution // RESOLUTION_STEP * RESOLUTION_STEP)
        raise ConfigError(
            f"the sam3 backend needs a multiple of {RESOLUTION_STEP} px (14-px patches × 24-token "
            f"windows), got {resolution}; try {lower} or {lower + RESOLUTION_STEP}",
            key="scratch.resolution",
        )


def _sam3_image_class():
    from sam3.model.sam3_image import Sam3Image

    return Sam3Image


class Sam3ImageWithPoints(_sam3_image_class()):  # type: ignore[misc]
    """``Sam3Image`` whose forward gives the geometry encoder points as well as boxes.

    Input (``BatchedDatapoint.find_inputs[0]``, B find queries, collated by
    ``collate_fn_api(input_points_embedding_dim=3)``):
        input_boxes        (Nb, B, 4)  normalised cx, cy, w, h
        input_boxes_mask   (B, Nb)     True = padding
        input_boxes_label  (Nb, B)     1 positive / 0 negative
        input_points       (B, Np, 3)  normalised x, y and label (1 positive / 0 negative)
        input_points_mask  (B, Np)     True = padding
    The geometry encoder receives points as (Np, B, 2) with labels (Np, B) — SAM3's
    ``Prompt`` layout (sequence first).
    Output: ``SAM3Output`` with one stage of one step, as ``Sam3Image.forward``, whose outputs
    also carry ``img_ids`` (Q,), the image of each find query (for
    :class:`~angioexp.backends.sam3.identity_loss.PromptIdentityLoss`).
    """

    def forward(self, input):  # noqa: A002 - SAM3's argument name
        from sam3.model.geometry_encoders import Prompt
        from sam3.model.model_misc import SAM3Output

        if not self.training and self.num_interactive_steps_val > 0:
            raise NotImplementedError("interactive validation steps are not supported by angioexp")
        assert len(input.find_inputs) == 1, "image model: one find stage per batch"
        backbone_out = {"img_batch_all_stages": input.img_batch}
        backbone_out.update(self.backbone.forward_image(input.img_batch))
        backbone_out.update(self.backbone.forward_text(input.find_text_batch, device=self.device))

        find_input, find_target = input.find_inputs[0], input.find_targets[0]
        geometric_prompt = Prompt(
            box_embeddings=find_input.input_boxes,
            box_mask=find_input.input_boxes_mask,
            box_labels=find_input.input_boxes_label,
            **self.point_prompt_kwargs(find_input),
        )
        out = self.forward_grounding(
            backbone_out=backbone_out,
            find_input=find_input,
            find_target=find_target,
            geometric_prompt=geometric_prompt,
        )
        # the image of each query: the identity loss groups the semantic maps per image with it
        out["img_ids"] = find_input.img_ids
        stages = SAM3Output(iter_mode=SAM3Output.IterMode.LAST_STEP_PER_STAGE)
        stages.append([out])
        return stages

    @staticmethod
    def point_prompt_kwargs(find_input) -> dict:
        """``Prompt`` keyword arguments for the points of a find stage ({} when it has none)."""
        points = find_input.input_points
        if points is None or points.numel() == 0:
            return {}
        if points.shape[-1] != 3:
            raise ValueError(
                f"input_points must be (B, N, 3) = x, y, label; got {tuple(points.shape)} "
                "(collate with input_points_embedding_dim=3)"
            )
        mask = find_input.input_points_mask
        if mask is None or mask.numel() == 0:
            mask = torch.zeros(points.shape[:2], dtype=torch.bool, device=points.device)
        return {
            "point_embeddings": points[..., :2].transpose(0, 1).contiguous(),  # (Np, B, 2)
            "point_mask": mask.bool(),  # (B, Np)
            "point_labels": points[..., 2].transpose(0, 1).long(),  # (Np, B)
        }


def make_matcher(focal: bool, cost_class: float, cost_bbox: float, cost_giou: float, alpha: float, gamma: float):
    """SAM3's ``BinaryHungarianMatcherV2`` with the configured costs (angioexp ``matcher.*``),
    reporting a non-finite cost to the NaN guard instead of crashing (:mod:`.matcher`)."""
    from angioexp.backends.sam3.matcher import GuardedHungarianMatcher

    return GuardedHungarianMatcher(
        focal=focal, cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
        alpha=alpha, gamma=gamma, stable=False,
    )


def resize_vit_rope(trunk, resolution: int) -> int:
    """Recompute the RoPE tables of the ViT's global-attention blocks for ``resolution``.

    Window blocks always see 24×24 tokens; only the global blocks depend on the image size.
    With ``use_interp_rope`` SAM3 scales positions so that the whole image spans the pretraining
    window grid, so the recomputed tables keep that meaning. Returns the number of blocks changed.
    """
    check_resolution(resolution)
    grid = resolution // PATCH_SIZE
    changed = 0
    for block in trunk.blocks:
        attn = block.attn
        if block.window_size != 0 or not attn.use_rope:
            continue
        if tuple(attn.input_size) == (grid, grid):
            continue
        attn.input_size = (grid, grid)
        device = attn.freqs_cis.device
        attn._setup_rope_freqs()  # SAM3's own computation, for the new grid
        attn.freqs_cis = attn.freqs_cis.to(device)
        changed += 1
    return changed


def init_text_encoder(text_encoder) -> None:
    """CLIP's init for the two text-encoder tensors SAM3 leaves as ``torch.empty``."""
    encoder = text_encoder.encoder
    with torch.no_grad():
        torch.nn.init.normal_(encoder.positional_embedding, std=0.01)
        projection = encoder.text_projection
        if isinstance(projection, torch.nn.Parameter):
            torch.nn.init.normal_(projection, std=encoder.width**-0.5)


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


DEFAULT_MATCHER = {"focal": True, "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "alpha": 0.25, "gamma": 2.0}


def build_components(bpe_path: str, resolution: int, enable_segmentation: bool) -> dict:
    """SAM3's own component builders; the ViT's RoPE resized, the text encoder initialised and
    its attention kernels pinned (checkpoint recomputes match the forward)."""
    from sam3 import model_builder as mb

    from angioexp.backends.sam3 import check_sam3_version
    from angioexp.backends.sam3.act_ckpt import pin_text_attention_kernels
    from angioexp.backends.sam3.cpu import cpu_shims

    check_sam3_version()  # the private builders below and resize_vit_rope are release-specific

    # SAM3's decoder and position encoding pre-compute caches with device="cuda".
    with cpu_shims():
        vision = mb._create_vision_backbone(enable_inst_interactivity=False)
        text = mb._create_text_encoder(bpe_path)
        transformer = mb._create_sam3_transformer()
    resize_vit_rope(vision.trunk, resolution)
    init_text_encoder(text)
    pin_text_attention_kernels(text)
    return {
        "backbone": mb._create_vl_backbone(vision, text),
        "transformer": transformer,
        "input_geometry_encoder": mb._create_geometry_encoder(),
        "segmentation_head": mb._create_segmentation_head() if enable_segmentation else None,
        "dot_prod_scoring": mb._create_dot_product_scoring(),
    }


def assemble_model(components: dict, matcher: dict | None) -> Sam3ImageWithPoints:
    """SAM3's own model wiring (``_create_sam3_model``) with our forward and our matcher.

    SAM3's wiring is called in eval mode so that it does not attach its hard-coded matcher;
    ``matcher`` (``BinaryHungarianMatcherV2`` kwargs) becomes the model's one-to-one matcher.
    """
    from sam3 import model_builder as mb

    model = mb._create_sam3_model(
        components["backbone"], components["transformer"], components["input_geometry_encoder"],
        components["segmentation_head"], components["dot_prod_scoring"],
        None,  # no SAM1-style interactive predictor
        True,  # eval_mode=True: no hard-coded matcher
    )
    model.__class__ = Sam3ImageWithPoints  # same modules and state, our forward
    model.matcher = make_matcher(**matcher) if matcher else None
    return model


def build_sam3_model(
    *,
    bpe_path: str | None = None,
    resolution: int = SAM3_NATIVE_RESOLUTION,
    enable_segmentation: bool = True,
    matcher: dict | None = None,
    activation_checkpointing: bool = True,
    checkpoint: str | None = None,
    checkpoint_prefix: str | None = None,
    min_loaded_fraction: float = 0.9,
    report_path: str | None = None,
    eval_mode: bool = False,
) -> Sam3ImageWithPoints:
    """Build SAM3's image model (random weights, or ``checkpoint`` with a verified load report).

    Args:
        bpe_path: BPE vocabulary; None → found in an installed package (never downloaded).
        resolution: input size in px, a multiple of 336.
        enable_segmentation: build the mask head.
        matcher: ``BinaryHungarianMatcherV2`` kwargs for one-to-one matching (None: SAM3's).
        activation_checkpointing: recompute activations in the backward pass (SAM3's default);
            False keeps them (more memory, less compute).
        checkpoint: vanilla ``sam3.pt``, a trainer checkpoint, a ``models:/`` URI, or a foreign
            state dict with SAM3 inside (found by key suffixes and shapes).
        checkpoint_prefix: the key prefix of SAM3's tree in a foreign state dict (None: found).
        min_loaded_fraction: fail (``CheckpointLoadError``) below this fraction of tensors loaded.
        report_path: where to write the load report JSON (the launcher reads it back).
        eval_mode: no matcher (inference only).
    """
    from angioexp.backends.sam3.act_ckpt import set_activation_checkpointing
    from angioexp.backends.sam3.weights import find_bpe_vocab, load_sam3_weights

    check_resolution(resolution)
    components = build_components(str(find_bpe_vocab(bpe_path)), resolution, enable_segmentation)
    model = assemble_model(components, matcher=None if eval_mode else (matcher or DEFAULT_MATCHER))
    model.angioexp_resolution = resolution
    set_activation_checkpointing(model, activation_checkpointing)

    if checkpoint:
        report = load_sam3_weights(model, checkpoint, min_loaded_fraction=min_loaded_fraction, prefix=checkpoint_prefix)
        log.info("SAM3 init: %s", report.summary())
        if report_path:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(report_path).write_text(json.dumps(report.as_dict(), indent=1), encoding="utf-8")
    bad = nonfinite_tensors(model)
    if bad:
        raise ValueError(f"non-finite values in {len(bad)} model tensors after init, e.g. {bad[:3]}")
    return model
