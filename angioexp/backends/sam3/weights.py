"""SAM3 weights in and out: the BPE vocabulary, and checkpoints loaded with a verified report.

SAM3's ``build_sam3_image_model(checkpoint_path=…)`` keeps only keys containing "detector",
loads them with ``strict=False`` and prints the missing keys. A checkpoint written by SAM3's own
trainer stores the model unprefixed under ``"model"``, so it loads **zero** tensors and training
silently starts from random weights. :func:`load_sam3_weights` recognises the three formats:

* vanilla ``sam3.pt`` (Meta's release): ``detector.*`` (image model) and ``tracker.*`` (video);
* a trainer checkpoint (``checkpoints/checkpoint.pt``): ``{"model": {...}, "optimizer": ...}``;
* a registered model (``models:/angio-stage1@champion``) or a bare state dict,
* a **foreign** state dict: SAM3 inside someone's own wrapper (other key prefixes, extra heads,
  saved as a plain ``.pth``) — the SAM3 sub-tree is found by the key prefix whose removal maps
  the most tensors onto model tensors of the same shape (or named by ``sam3.checkpoint_prefix``);
  the wrapper's own tensors are listed as ``unexpected`` in the report,

read memory-mapped (each of several GPU processes would otherwise hold a full copy in host
memory), loads through :func:`angioexp.checkpoints.load_state_with_report` (``weights_only=True``),
checks that every loaded tensor now equals its source, and fails with ``CheckpointLoadError``
below ``min_loaded_fraction``. RoPE ``freqs_cis`` buffers are skipped on purpose: they are a
function of the resolution and are recomputed (a 1008-px checkpoint loads into a 336-px model).
"""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
import importlib.util
import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from angioexp.checkpoints import LoadReport, extract_state_dict, load_state_with_report, read_checkpoint
from angioexp.errors import CheckpointLoadError, InputError

log = logging.getLogger(__name__)

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# md5 of the vocabulary SAM3 ships in its GitHub tree (identical to open-clip-torch's copy).
BPE_MD5 = "933b7abbbbde62c36f02f0e6ccde464f"
# Installed packages that ship the same file, searched in this order (the PyPI sam3 wheel does not).
BPE_PACKAGES = ("sam3", "open_clip")

VANILLA_PREFIX = "detector."
VIDEO_ONLY_PREFIX = "tracker."  # the video tracker's weights in sam3.pt; not part of the image model


# --- the BPE vocabulary ------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bpe_candidates() -> list[Path]:
    out = []
    env = os.environ.get("ANGIOEXP_SAM3_BPE")
    if env:
        out.append(Path(env))
    for package in BPE_PACKAGES:
        root = _package_dir(package)
        if root is not None:
            out += [root / "assets" / BPE_NAME, root / BPE_NAME]
    return out


def find_bpe_vocab(user_path: str | os.PathLike | None = None) -> Path:
    """The BPE vocabulary: ``sam3.bpe_path`` if given, else an installed copy. Never downloads."""
    if user_path:
        path = Path(user_path).expanduser()
        if not path.is_file():
            raise InputError("BPE vocabulary not found", file=path, key="sam3.bpe_path")
        _check_bpe(path)
        return path
    for path in bpe_candidates():
        if path.is_file():
            return path
    raise InputError(
        f"SAM3's BPE vocabulary ({BPE_NAME}) is not installed: the PyPI sam3 wheel lacks it. "
        "Install open-clip-torch (it ships the same file) or set sam3.bpe_path",
        key="sam3.bpe_path",
    )


def _check_bpe(path: Path) -> None:
    try:
        with gzip.open(path, "rb") as handle:
            handle.readline()
    except OSError as exc:
        raise InputError(f"not a gzip BPE vocabulary ({exc})", file=path, key="sam3.bpe_path") from None
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != BPE_MD5:
        log.warning("BPE vocabulary %s differs from SAM3's (md5 %s != %s)", path, digest, BPE_MD5)


# --- checkpoints -------------------------------------------------------------------------------


def resolve_checkpoint(source: str) -> Path:
    """A local file for ``source``: a path, or a ``models:/``/``runs:/`` URI downloaded via MLflow."""
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        return Path(source).expanduser()
    try:  # the platform's resolver (registry aliases, LoggedModels; weights.pt inside)
        from angioexp.tracking.models import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        return Path(resolve_model(source).weights)
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a missing model
        raise InputError(f"cannot resolve {source}: {type(exc).__name__}: {exc}", key="sam3.checkpoint") from None
    if local.is_file():
        return local
    candidates = sorted(p for p in local.rglob("*") if p.suffix in (".pt", ".pth", ".bin") and p.is_file())
    preferred = [p for p in candidates if p.stem in ("weights", "state_dict", "model_weights", "checkpoint")]
    chosen = (preferred or candidates)[:1]
    if not chosen:
        raise InputError(f"{source}: no .pt/.pth weights file in the downloaded artifacts ({local})", key="sam3.checkpoint")
    return chosen[0]


def read_payload(path: Path):
    """What ``path`` holds, memory-mapped (``torch.load(mmap=True, weights_only=True)``):
    tensors are paged in from the file as they are used, not read up front. Files in torch's
    legacy (pre-zip) format cannot be mapped and are read whole."""
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - legacy format, or corrupt: read_checkpoint says which
            log.debug("%s: not memory-mappable (%s); reading it whole", path, exc)
    return read_checkpoint(path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``path``, memory-mapped (:func:`read_payload`)."""
    return extract_state_dict(read_payload(path))


# Key fragments only SAM3's image model has (its VL backbone's two towers), under any prefix.
SAM3_KEY_MARKS = ("backbone.vision_backbone.trunk.", "backbone.language_backbone.")


def looks_like_sam3(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds SAM3's image model (vanilla, trainer, exported or foreign)."""
    return all(any(mark in name for name in state) for mark in SAM3_KEY_MARKS)


def find_prefix(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple[str, int]:
    """The key prefix whose removal maps the most tensors of ``state`` onto ``model`` tensors of
    the same shape (``""``: none), and how many it maps. Ties go to the shorter prefix."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    counts: Counter[str] = Counter()
    for name, tensor in state.items():
        if skip_rule(name):
            continue
        for cut in [0] + [i + 1 for i, ch in enumerate(name) if ch == "."]:
            if shapes.get(name[cut:]) == tuple(tensor.shape):
                counts[name[:cut]] += 1
    if not counts:
        return "", 0
    return max(counts.items(), key=lambda item: (item[1], -len(item[0])))


def checkpoint_format(state: Mapping[str, torch.Tensor]) -> str:
    """'vanilla' (Meta's sam3.pt), 'ddp' (``module.`` prefixes) or 'plain'."""
    names = list(state)
    if any(n.startswith(VANILLA_PREFIX) for n in names):
        return "vanilla"
    if names and all(n.startswith("module.") for n in names):
        return "ddp"
    return "plain"


def _rename_for(fmt: str):
    if fmt == "vanilla":
        return lambda n: n[len(VANILLA_PREFIX):] if n.startswith(VANILLA_PREFIX) else n
    if fmt == "ddp":
        return lambda n: n[len("module."):]
    return lambda n: n


def skip_rule(name: str) -> bool:
    """Tensors dropped on purpose (counted in ``skipped_by_rule``)."""
    return name.endswith("freqs_cis") or name.startswith(VIDEO_ONLY_PREFIX)


def _strip(prefix: str):
    return lambda n: n[len(prefix):] if n.startswith(prefix) else n


def load_sam3_weights(
    model: torch.nn.Module,
    source: str,
    *,
    min_loaded_fraction: float = 0.9,
    state: Mapping[str, torch.Tensor] | None = None,
    prefix: str | None = None,
) -> LoadReport:
    """Load SAM3 weights from ``source`` into ``model``; verify; fail below ``min_loaded_fraction``.

    ``prefix``: the key prefix of SAM3's tree in a foreign state dict (``sam3.checkpoint_prefix``;
    None: the known formats, else found by matching key suffixes and shapes)."""
    if state is None:
        state = read_weights(resolve_checkpoint(source))
    if prefix is not None:
        if not any(name.startswith(prefix) for name in state):
            raise CheckpointLoadError(f"{source}: no tensor name starts with sam3.checkpoint_prefix '{prefix}' "
                                      f"(the names start like {sorted(state)[:3]})")
        fmt, rename = f"prefix '{prefix}'", _strip(prefix)
    else:
        fmt = checkpoint_format(state)
        rename = _rename_for(fmt)
        found, mapped = find_prefix(state, model)
        own = model.state_dict()
        direct = sum(1 for name in state if not skip_rule(rename(name)) and rename(name) in own)
        if mapped > direct:  # SAM3 inside another model: its sub-tree sits under `found`
            fmt, rename = f"foreign, SAM3 under prefix '{found}'", _strip(found)
    report = load_state_with_report(
        model, state, source=f"{source} ({fmt})", min_loaded_fraction=min_loaded_fraction,
        skip=skip_rule, rename=rename,
    )
    if report.unexpected:
        log.info("SAM3 init from %s: %d tensors of the checkpoint left out (not SAM3's), e.g. %s",
                 source, len(report.unexpected), report.unexpected[:5])
    # Verify: every tensor reported as loaded must now hold the checkpoint's values.
    own = model.state_dict()
    by_name = {rename(k): v for k, v in state.items()}
    wrong = [n for n in report.loaded if not torch.equal(own[n], by_name[n].to(dtype=own[n].dtype))]
    if wrong:
        raise CheckpointLoadError(f"{source}: {len(wrong)} tensors differ after loading, e.g. {wrong[:3]}", report)
    return report


def export_model_state(trainer_checkpoint: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write only the model weights of a SAM3 trainer checkpoint (no optimizer): the file a
    LoggedModel / registry version carries, loadable with ``weights_only=True``."""
    from angioexp.fileio import atomic_file

    state = read_weights(Path(trainer_checkpoint))
    out_path = Path(out_path)
    with atomic_file(out_path, "wb") as handle:
        torch.save(state, handle)
    return out_path
