"""A SAM3 data transform that gives find queries angioexp's centreline point prompts.

SAM3's ``RandomGeometricInputsAPI`` only touches queries whose text equals
``geometric_query_str`` (``"visual"``), and ``COCO_FROM_JSON`` names every query after its
category ("coronary artery"): with the researcher's config the transform never fired. Its
``'centered'`` mode also piles points on the thickest vessel (distance-transform maxima).

:class:`CentrelinePrompts` runs after ``DecodeRle`` (decoded uint8 masks, original pixel
coordinates; SAM3's resize/pad/normalise transforms then move the points with the image). For
every query with targets it samples ``prompts.*`` from the union of the target masks with
:func:`angioexp.prompts.geometric.sample_geometric_prompt` and stores

    query.input_points      (1, P, 3) float  x, y (pixels), label (1 positive, 0 negative)
    query.input_bbox        (1, 4)    float  x0, y0, x1, y1 pixels   (with box_chance)
    query.input_bbox_label  (1,)      long   1

With ``use_text: false`` the query's text becomes ``geometric_query_str`` ("visual": SAM3's
placeholder for a geometry-only prompt).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from angioexp.prompts.geometric import sample_geometric_prompt


class CentrelinePrompts:
    def __init__(
        self,
        num_points: list[int] | tuple[int, int] = (0, 0),
        num_negative_points: int = 0,
        box_chance: float = 0.0,
        point_sample_mode: str = "centreline",
        resample_box_from_mask: bool = True,
        box_noise_std: float = 0.0,
        box_noise_max: float | None = None,
        use_text: bool = True,
        geometric_query_str: str = "visual",
        seed: int | None = None,
    ):
        self.prompts = SimpleNamespace(
            num_points=tuple(int(n) for n in num_points),
            num_negative_points=int(num_negative_points),
            box_chance=float(box_chance),
            point_sample_mode=point_sample_mode,
            resample_box_from_mask=bool(resample_box_from_mask),
            box_noise_std=float(box_noise_std),
            box_noise_max=box_noise_max,
        )
        self.use_text = use_text
        self.geometric_query_str = geometric_query_str
        self.seed = seed  # fixed seed (validation); None: drawn from torch's seeded generator

    def _rng(self, datapoint) -> np.random.Generator:
        if self.seed is not None:
            key = [self.seed] + [int(q.inference_metadata.original_image_id) for q in datapoint.find_queries[:1] if q.inference_metadata]
            return np.random.default_rng(key)
        # SAM3 seeds torch per rank and dataloader worker, so this is reproducible too.
        return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))

    def __call__(self, datapoint, **kwargs):
        rng = self._rng(datapoint)
        for query in datapoint.find_queries:
            if not query.object_ids_output:
                continue  # absent concept: nothing to point at
            image = datapoint.images[query.image_id]
            segments = [image.objects[i].segment for i in query.object_ids_output]
            if any(s is None or not isinstance(s, torch.Tensor) for s in segments):
                raise ValueError("CentrelinePrompts needs decoded masks: put it after DecodeRle")
            union = torch.stack([s.bool() for s in segments]).any(0).numpy()
            prompt = sample_geometric_prompt(union, self.prompts, rng)
            if len(prompt.points):
                xyl = np.concatenate([prompt.points, prompt.labels[:, None].astype(np.float32)], axis=1)
                query.input_points = torch.as_tensor(xyl, dtype=torch.float32)[None]
            else:
                query.input_points = None
            if prompt.box is not None:
                query.input_bbox = torch.as_tensor(prompt.box, dtype=torch.float32).view(1, 4)
                query.input_bbox_label = torch.ones(1, dtype=torch.long)
            else:
                query.input_bbox, query.input_bbox_label = None, None
            if not self.use_text and (query.input_points is not None or query.input_bbox is not None):
                query.query_text = self.geometric_query_str
        return datapoint
