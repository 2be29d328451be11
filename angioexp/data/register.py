"""A COCO dataset's identity (digest), per-image manifest and profile, logged to MLflow.

``dataset_digest(coco_dir)`` hashes, for every split: the categories, and per image its PNG
bytes, its image entry (minus the id) and its annotations (minus ids) — in ``annotations.json``
and, when present, ``annotations_gt.json``. It is recomputed from the files every time (never
trusted from ``manifest.json``), so it is stable across re-runs and re-conversions of the same
input and changes when any pixel, label or image attribute changes.

``split_dataset(coco_dir, split)`` is an ``mlflow.data`` pandas dataset of the per-image
manifest (one row per image: ids, content hashes, instance counts per category, view, vessel
fraction) whose digest is the split's content digest. ``log_coco_inputs`` logs those as inputs
of the active run; ``angioexp register --coco DIR`` makes a run ``register-<digest>`` for them.
mlflow is imported only inside the functions that log.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import warnings
from pathlib import Path

from pycocotools import mask as mask_utils

from angioexp.errors import InputError

log = logging.getLogger(__name__)

DIGEST_LENGTH = 12  # hex characters: 48 bits, plenty to tell datasets apart
SPLIT_ORDER = ("train", "val", "test")
DEFAULT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def _canonical_sha256(payload) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise InputError("file not found", file=path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} (line {exc.lineno})", file=path) from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError("not a COCO file (needs images, annotations, categories)", file=path)
    return data


def coco_splits(coco_dir: str | Path) -> list[str]:
    """Splits of a COCO dir (folders with an annotations.json), train/val/test first."""
    coco_dir = Path(coco_dir)
    if not coco_dir.is_dir():
        raise InputError("COCO folder not found", file=coco_dir)
    found = sorted(p.parent.name for p in coco_dir.glob("*/annotations.json"))
    ordered = [s for s in SPLIT_ORDER if s in found] + [s for s in found if s not in SPLIT_ORDER]
    if not ordered:
        raise InputError("no split found (expected <split>/annotations.json)", file=coco_dir)
    return ordered


def _annotations_by_image(data: dict) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for anns in by_image.values():
        anns.sort(key=lambda a: a["id"])
    return by_image


def _strip_ids(anns: list[dict]) -> list[dict]:
    return [{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in anns]


def _vessel_fraction(anns: list[dict], height: int, width: int) -> float:
    """Fraction of the frame covered by the union of the given instances."""
    if not anns:
        return 0.0
    rles = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode("ascii")}
            if isinstance(a["segmentation"]["counts"], str) else a["segmentation"] for a in anns]
    union = mask_utils.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
    return float(mask_utils.area(union)) / float(height * width)


def split_manifest(coco_dir: str | Path, split: str, *, vessel_fraction: bool = True):
    """One row per image of ``split``: content hashes, counts per category, view, vessel fraction.

    Returns ``(dataframe, split_digest, categories)``. ``vessel_fraction=False`` skips the
    RLE unions (NaN column) when only the digest is wanted.
    """
    import pandas as pd

    split_dir = Path(coco_dir) / split
    data = _read_json(split_dir / "annotations.json")
    gt_path = split_dir / "annotations_gt.json"
    gt = _annotations_by_image(_read_json(gt_path)) if gt_path.is_file() else None
    by_image = _annotations_by_image(data)
    names = {c["id"]: c["name"] for c in data["categories"]}

    rows, hash_items = [], []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        png = split_dir / image["file_name"]
        try:
            png_sha = hashlib.sha256(png.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise InputError(f"image file not found: {image['file_name']}", file=split_dir / "annotations.json",
                             key=f"images[id={image['id']}].file_name") from None
        anns = by_image.get(image["id"], [])
        ann_sha = _canonical_sha256(_strip_ids(anns))
        gt_sha = _canonical_sha256(_strip_ids(gt.get(image["id"], []))) if gt is not None else None
        entry_sha = _canonical_sha256({k: v for k, v in image.items() if k != "id"})
        hash_items.append([image["file_name"], png_sha, entry_sha, ann_sha, gt_sha])
        counts = {f"n_{names[c]}".replace(" ", "_"): 0 for c in names}
        for ann in anns:
            counts[f"n_{names[ann['category_id']]}".replace(" ", "_")] += 1
        vessel_anns = [a for a in anns if names.get(a["category_id"]) != "catheter"]  # devices aren't vessels
        rows.append({
            "image_id": image["id"],
            "file_name": image["file_name"],
            "case_id": image.get("case_id"),
            "patient_id": image.get("patient_id"),
            "view": image.get("view"),
            "primary_angle": image.get("primary_angle"),
            "secondary_angle": image.get("secondary_angle"),
            "height": image["height"],
            "width": image["width"],
            "image_sha256": png_sha,
            "annotation_sha256": ann_sha,
            "gt_annotation_sha256": gt_sha,
            "instances": len(anns),
            **counts,
            "vessel_fraction": _vessel_fraction(vessel_anns, image["height"], image["width"])
            if vessel_fraction else float("nan"),
        })
    categories = sorted(data["categories"], key=lambda c: c["id"])
    digest = _canonical_sha256({"split": split, "categories": categories, "images": hash_items})[:DIGEST_LENGTH]
    return pd.DataFrame(rows), digest, categories


def dataset_digest(coco_dir: str | Path) -> str:
    """Short hex digest of every split's pixels, image entries and annotations (see module doc)."""
    per_split = {split: split_manifest(coco_dir, split, vessel_fraction=False)[1] for split in coco_splits(coco_dir)}
    return _canonical_sha256(per_split)[:DIGEST_LENGTH]


def dataset_profile(coco_dir: str | Path, manifests: dict | None = None) -> dict:
    """Counts per split, category and view; vessel-fraction mean/min/max; digests.

    ``manifests``: {split: split_manifest(...)} already computed (saves re-hashing the PNGs).
    """
    coco_dir = Path(coco_dir)
    manifests = manifests or {split: split_manifest(coco_dir, split) for split in coco_splits(coco_dir)}
    profile: dict = {"splits": {}}
    manifest_path = coco_dir / "manifest.json"
    if manifest_path.is_file():
        profile["stage"] = json.loads(manifest_path.read_text(encoding="utf-8")).get("stage")
    split_digests = {}
    for split, (df, digest, categories) in manifests.items():
        split_digests[split] = digest
        fraction = df["vessel_fraction"] if len(df) else None
        per_category = {c["name"]: int(df[f"n_{c['name']}".replace(' ', '_')].sum()) for c in categories}
        profile["splits"][split] = {
            "digest": digest,
            "images": int(len(df)),
            "instances": int(df["instances"].sum()) if len(df) else 0,
            "patients": int(df["patient_id"].nunique()) if len(df) else 0,
            "instances_per_category": per_category,
            "images_per_view": {str(k): int(v) for k, v in df["view"].fillna("unknown").value_counts().sort_index().items()},
            "vessel_fraction": None if fraction is None else {
                "mean": float(fraction.mean()), "min": float(fraction.min()), "max": float(fraction.max())
            },
            "has_clean_labels": bool(df["gt_annotation_sha256"].notna().all()) if len(df) else False,
        }
    profile["digest"] = _canonical_sha256(split_digests)[:DIGEST_LENGTH]
    return profile


@contextlib.contextmanager
def _no_integer_column_hint():
    """Silence MLflow's schema hint about integer columns: it concerns model signatures, and
    the per-image manifest's counts are integers by nature."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        yield


def _dataset_name(coco_dir: Path) -> str:
    return coco_dir.resolve().name


def split_dataset(coco_dir: str | Path, split: str, manifest: tuple | None = None):
    """``mlflow.data`` pandas dataset of a split's per-image manifest; digest = content digest."""
    import mlflow.data
    from mlflow.data.sources import LocalArtifactDatasetSource

    coco_dir = Path(coco_dir)
    df, digest, _ = manifest or split_manifest(coco_dir, split)
    source = LocalArtifactDatasetSource((coco_dir / split).resolve().as_uri())
    with _no_integer_column_hint():
        return mlflow.data.from_pandas(df, source=source, name=f"{_dataset_name(coco_dir)}/{split}", digest=digest)


def log_coco_inputs(coco_dir: str | Path, splits: dict[str, str] | None = None, *, log_profile: bool = True) -> str:
    """Log ``splits`` ({split: context}) of ``coco_dir`` as inputs of the ACTIVE MLflow run.

    Also logs ``dataset/profile.json`` (with ``log_profile``). Returns the dataset digest.
    """
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_coco_inputs needs an active MLflow run (mlflow.start_run())")
    splits = dict(splits or {"train": "training", "val": "validation"})
    available = coco_splits(coco_dir)
    for split in splits:
        if split not in available:
            raise InputError(f"split {split!r} not found (have: {', '.join(available)})", file=coco_dir)
    manifests = {split: split_manifest(coco_dir, split) for split in available}
    datasets = [split_dataset(coco_dir, split, manifests[split]) for split in splits]
    with _no_integer_column_hint():
        mlflow.log_inputs(datasets=datasets, contexts=list(splits.values()), tags_list=[None] * len(datasets))
    profile = dataset_profile(coco_dir, manifests)
    if log_profile:
        mlflow.log_dict(profile, "dataset/profile.json")
    return profile["digest"]


def register(coco_dir: str | Path, *, experiment: str = "angioexp-datasets") -> tuple[str, str]:
    """Make a run ``register-<digest>`` logging every split as an input + the profile.

    Returns ``(run_id, digest)``.
    """
    import mlflow

    from angioexp.tracking import uri as tracking_uri

    coco_dir = Path(coco_dir)
    splits = coco_splits(coco_dir)
    manifests = {split: split_manifest(coco_dir, split) for split in splits}
    profile = dataset_profile(coco_dir, manifests)
    digest = profile["digest"]
    uri = tracking_uri.configure_mlflow()
    tracking_uri.check_tracking_server(uri)  # a clear error now, not minutes of HTTP retries
    experiment_id = tracking_uri.ensure_experiment(experiment)
    contexts = {s: DEFAULT_CONTEXTS.get(s, s) for s in splits}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{digest}") as run:
        mlflow.set_tags({"dataset.digest": digest, "dataset.path": str(coco_dir.resolve()),
                         "stage": str(profile.get("stage"))})
        with _no_integer_column_hint():
            mlflow.log_inputs(datasets=[split_dataset(coco_dir, s, manifests[s]) for s in splits],
                              contexts=list(contexts.values()), tags_list=[None] * len(splits))
        params = {"dataset.digest": digest, "stage": profile.get("stage")}
        metrics = {}
        for split, info in profile["splits"].items():
            params[f"{split}.digest"] = info["digest"]
            metrics[f"{split}/images"] = info["images"]
            metrics[f"{split}/instances"] = info["instances"]
            metrics[f"{split}/patients"] = info["patients"]
            if info["vessel_fraction"]:
                for stat, value in info["vessel_fraction"].items():
                    metrics[f"{split}/vessel_fraction_{stat}"] = value
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(profile, "dataset/profile.json")
        if (coco_dir / "manifest.json").is_file():
            mlflow.log_artifact(str(coco_dir / "manifest.json"), "dataset")
        for split, (df, _, _) in manifests.items():
            mlflow.log_text(df.to_csv(index=False), f"dataset/{split}_images.csv")
        return run.info.run_id, digest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco", required=True, help="COCO folder written by `angioexp convert`")
    parser.add_argument("--experiment", default="angioexp-datasets", help="MLflow experiment")


def run(args: argparse.Namespace) -> int:
    run_id, digest = register(args.coco, experiment=args.experiment)
    print(f"dataset digest {digest}; run {run_id}")
    return 0
