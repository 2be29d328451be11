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

import importlib.metadata
import importlib.util

# The backend calls SAM3's private component builders (sam3.model_builder._create_*) and rebuilds
# the ViT's RoPE tables through attn.freqs_cis / _setup_rope_freqs: SAM 3.1's RoPE rework breaks
# both, so only the tested release is accepted (pyproject.toml pins the same).
SUPPORTED_SAM3 = "0.1.4"

SAM3_MISSING = (
    "the sam3 backend needs the sam3 package and its training dependencies: "
    "pip install 'angioexp[sam3]' (torch and torchvision must be a matching pair)"
)


def sam3_available() -> bool:
    return importlib.util.find_spec("sam3") is not None


def sam3_version() -> str | None:
    try:
        return importlib.metadata.version("sam3")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_sam3_version(installed: str | None = None) -> None:
    """One line naming the supported release when another sam3 is installed."""
    from angioexp.errors import InputError

    installed = installed if installed is not None else sam3_version()
    if installed != SUPPORTED_SAM3:
        raise InputError(
            f"sam3 {installed or '(version unknown)'} is installed, but the sam3 backend supports sam3=={SUPPORTED_SAM3} "
            f"only (it uses SAM3's private model builders and RoPE tables): pip install 'sam3=={SUPPORTED_SAM3}'",
            key="backend")
