"""The ``sam3`` training backend: Meta's SAM3 trainer, run from an angioexp config.

Modules: ``config_gen`` (angioexp Config → SAM3 Hydra config), ``model`` (points, matcher,
resolution, text-encoder init), ``act_ckpt`` (checkpoint recomputes that match their forward;
the ``sam3.activation_checkpointing`` switch), ``weights`` (BPE vocabulary, verified checkpoint
loading), ``trainer`` (NaN guard), ``writer`` (live MLflow scalars), ``transforms`` (centreline
point prompts), ``cpu`` (CPU shims), ``launch`` (one subprocess per run), ``run``
(``train_sam3``), ``doctor`` (``angioexp doctor``: pitfalls of an existing SAM3 config),
``gpu_check``.

Only ``doctor`` works without the ``sam3`` package installed.
"""

from __future__ import annotations

import importlib.util

SAM3_MISSING = (
    "the sam3 backend needs the sam3 package and its training dependencies: "
    "pip install 'angioexp[sam3]' (torch and torchvision must be a matching pair)"
)


def sam3_available() -> bool:
    return importlib.util.find_spec("sam3") is not None
