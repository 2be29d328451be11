"""``generate()``: a synthetic angiography study in the researcher's index.csv layout (docs/design.md#raw-layout).

Layout written (paths in index.csv are relative to its folder)::

    index.csv        one row per case (= one acquisition of one patient, annotated frame)
    cines/<id>.npy   T×H×W uint8 — or uint16 (12-bit, 0–4095) for every 4th case
    masks/<id>.npy   H×W uint8 0/1 pseudo-label (DeepSA-like, the training label)
    gt_masks/<id>.npy  H×W uint8 0/1 clean full-tree label
    segments/<id>.npy  H×W uint8 segment labels (angioexp.segments; 0 = background, 26 = catheter)
    manifest.json    generator version, seed, every argument and knob, split/dominance/view
                     counts, pseudo-label Dice vs clean (mean/std), per-case details
    preview.png      with preview=True: a contact sheet

Reproducibility: the study plan (patients, views, splits) comes from one seeded stream; each
patient's anatomy and each acquisition from their own ``numpy.random.SeedSequence`` streams keyed
by (seed, patient, view). Output is therefore byte-identical for the same seed and arguments
whatever the number of worker processes. Everything is written into a temporary sibling folder
that is renamed into place at the end (``angioexp.fileio.atomic_dir``): a crash or Ctrl-C
leaves nothing behind.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from angioexp.data.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, SPLITS
from angioexp.data.synthetic.anatomy import DOMINANCE_PREVALENCE, make_patient
from angioexp.data.synthetic.labels import PseudoLabelModel, case_dice_target, clean_and_segments, pseudo_label
from angioexp.data.synthetic.projection import LEFT_VIEWS, RIGHT_VIEWS, STANDARD_VIEWS
from angioexp.data.synthetic.render import RenderKnobs, render_case
from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs, write_bytes_atomic, write_json_atomic

GENERATOR = "angioexp.data.synthetic"
GENERATOR_VERSION = "1.0.0"
MIN_CASES = 3  # one patient per split at least
SIZE_RANGE = (128, 1024)
SIZE_MULTIPLE = 16
FRAMES_RANGE = (1, 256)
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# Streams of numpy.random.SeedSequence(seed, spawn_key=(STREAM, ...)).
_PLAN, _PATIENT, _CASE = 0, 1, 2


@dataclass(frozen=True)
class StudyKnobs:
    """Study-level knobs (the per-image ones are RenderKnobs and PseudoLabelModel)."""

    left_view_fraction: float = 0.7  # share of left-system acquisitions (as in ARCADE)
    max_views_per_patient: int = 4
    uint16_every: int = 4  # every n-th case (1-based) stores its cine as 12-bit uint16; 0 = never


@dataclass(frozen=True)
class Knobs:
    study: StudyKnobs
    render: RenderKnobs
    pseudo: PseudoLabelModel

    def to_dict(self) -> dict:
        out = {}
        for part in (self.study, self.render, self.pseudo):
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def knob_names() -> list[str]:
    names = []
    for cls in (StudyKnobs, RenderKnobs, PseudoLabelModel):
        names += [f.name for f in dataclasses.fields(cls) if f.name != "target_dice"]
    return names


def build_knobs(pseudo_dice: float, overrides: dict) -> Knobs:
    """Knobs from defaults + ``overrides`` (flat names); unknown or ill-typed → InputError."""
    parts = {cls: {} for cls in (StudyKnobs, RenderKnobs, PseudoLabelModel)}
    fields = {f.name: (cls, f) for cls in parts for f in dataclasses.fields(cls) if f.name != "target_dice"}
    for name, raw in overrides.items():
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(sorted(fields))}"
            raise InputError(f"unknown synthetic-data knob{hint}", key=name)
        cls, f = fields[name]
        default = getattr(cls(), name)
        parts[cls][name] = _coerce(name, raw, default)
    parts[PseudoLabelModel]["target_dice"] = float(pseudo_dice)
    try:
        return Knobs(StudyKnobs(**parts[StudyKnobs]), RenderKnobs(**parts[RenderKnobs]), PseudoLabelModel(**parts[PseudoLabelModel]))
    except TypeError as exc:  # pragma: no cover - guarded by the name check above
        raise InputError(str(exc)) from None


def _coerce(name: str, raw, default):
    """Convert a knob value (possibly a CLI string such as '0.2,0.5') to the default's type."""
    try:
        if isinstance(default, tuple):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            if len(items) != 2:
                raise ValueError("expected two numbers 'low,high'")
            lo, hi = (float(v) for v in items)
            if not np.isfinite([lo, hi]).all() or lo > hi:
                raise ValueError("expected finite low ≤ high")
            return (lo, hi)
        if isinstance(default, bool):
            return bool(raw)
        if isinstance(default, int):
            value = int(raw)
            if value < 0:
                raise ValueError("must be ≥ 0")
            return value
        value = float(raw)
        if not np.isfinite(value) or value < 0:
            raise ValueError("must be a finite number ≥ 0")
        if name.endswith(("_prob", "_fraction")) and value > 1:
            raise ValueError("must be a probability in [0, 1]")
        return value
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad value {raw!r}: {exc}", key=name) from None


# ---------------------------------------------------------------------------------------------
# Study plan


@dataclass(frozen=True)
class CasePlan:
    index: int  # position in index.csv
    case_id: str
    patient_index: int
    view_index: int
    view: str
    system: str  # "left" / "right": which coronary is injected
    primary: float
    secondary: float
    split: str
    dtype: str

    @property
    def patient_id(self) -> str:
        return f"p{self.patient_index:04d}"


def plan_study(cases: int, seed: int, study: StudyKnobs) -> list[CasePlan]:
    """Patients with 1–4 acquisitions each (both systems mixed), patient-level splits."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN,)))
    # Small studies cap views per patient so that every split gets a patient.
    cap = max(1, min(study.max_views_per_patient, cases // 3))
    per_patient: list[int] = []
    while sum(per_patient) < cases:
        k = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
        per_patient.append(min(k, cap, cases - sum(per_patient)))
    n_patients = len(per_patient)
    order = rng.permutation(n_patients)
    n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * n_patients)))
    n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * n_patients)))
    split_of = {}
    for rank, p in enumerate(order):
        split_of[int(p)] = "val" if rank < n_val else ("test" if rank < n_val + n_test else "train")

    left_w = study.left_view_fraction / len(LEFT_VIEWS)
    right_w = (1.0 - study.left_view_fraction) / len(RIGHT_VIEWS)
    names = list(LEFT_VIEWS) + list(RIGHT_VIEWS)
    weights = np.array([left_w] * len(LEFT_VIEWS) + [right_w] * len(RIGHT_VIEWS))
    plans: list[CasePlan] = []
    for p, k in enumerate(per_patient):
        chosen = rng.choice(len(names), size=k, replace=False, p=weights / weights.sum())
        for v, j in enumerate(chosen):
            system, primary, secondary = STANDARD_VIEWS[names[int(j)]]
            index = len(plans)
            every = study.uint16_every
            plans.append(
                CasePlan(
                    index=index,
                    case_id=f"p{p:04d}_v{v}",
                    patient_index=p,
                    view_index=v,
                    view=names[int(j)],
                    system=system,
                    # Operators never hit the nominal angle exactly.
                    primary=round(float(np.clip(primary + rng.normal(0, 3.0), -120, 120)), 1),
                    secondary=round(float(np.clip(secondary + rng.normal(0, 3.0), -45, 45)), 1),
                    split=split_of[p],
                    dtype="uint16" if every and (index + 1) % every == 0 else "uint8",
                )
            )
    return plans


# ---------------------------------------------------------------------------------------------
# Workers


@dataclass(frozen=True)
class _PatientTask:
    seed: int
    patient_index: int
    cases: tuple[CasePlan, ...]
    size: int
    frames: int
    knobs: Knobs
    folder: str


def _run_patient(task: _PatientTask) -> list[dict]:
    """Render every acquisition of one patient into ``task.folder``; returns row + stats dicts."""
    patient_rng = np.random.default_rng(np.random.SeedSequence(task.seed, spawn_key=(_PATIENT, task.patient_index)))
    patient = make_patient(task.patient_index, patient_rng)
    folder = Path(task.folder)
    results = []
    for plan in task.cases:
        rng = np.random.default_rng(np.random.SeedSequence(task.seed, spawn_key=(_CASE, task.patient_index, plan.view_index)))
        rc = render_case(
            patient, plan.system, plan.primary, plan.secondary, task.size, task.frames, rng, task.knobs.render, plan.dtype
        )
        clean, segments, _ = clean_and_segments(rc.sdf, rc.owner, rc.capsules, rc.catheter, rc.visible)
        if not clean.any():  # cannot happen with a centred tree; never write an empty label
            raise RuntimeError(f"{plan.case_id}: the coronary tree fell outside the image")
        sdf = np.where(rc.visible, rc.sdf, rc.margin)
        cath_arc = np.where(rc.visible, rc.catheter_arc, np.inf)
        pseudo, pinfo = pseudo_label(
            clean, sdf, rc.owner, rc.capsules, rc.parents, cath_arc, rng, task.knobs.pseudo, rc.margin,
            target=case_dice_target(task.knobs.pseudo, plan.index),
        )
        paths = {
            "cine_path": f"cines/{plan.case_id}.npy",
            "mask_path": f"masks/{plan.case_id}.npy",
            "gt_mask_path": f"gt_masks/{plan.case_id}.npy",
            "segment_mask_path": f"segments/{plan.case_id}.npy",
        }
        np.save(folder / paths["cine_path"], rc.frames)
        np.save(folder / paths["mask_path"], pseudo)
        np.save(folder / paths["gt_mask_path"], clean.astype(np.uint8))
        np.save(folder / paths["segment_mask_path"], segments)
        row = {
            "case_id": plan.case_id,
            "patient_id": plan.patient_id,
            "split": plan.split,
            "frame_index": rc.frame_index,
            "primary_angle": f"{plan.primary:.1f}",
            "secondary_angle": f"{plan.secondary:.1f}",
            "pixel_spacing_mm": f"{rc.info['iso_pixel_mm']:.4f}",
            "source": "synthetic",
            "view": plan.view,
            "dominance": patient.dominance,
            **paths,
        }
        labels_present = [int(v) for v in np.flatnonzero(np.bincount(segments.ravel(), minlength=256)) if v]
        results.append(
            {
                "row": row,
                "detail": {
                    "case_id": plan.case_id,
                    "dtype": plan.dtype,
                    "pseudo_dice": round(pinfo["dice"], 4),
                    "pseudo_target": round(pinfo["target"], 4),
                    "pseudo_errors": pinfo["errors"],
                    "width_bias_px": pinfo["width_bias_px"],
                    "vessel_fraction": round(float(clean.mean()), 5),
                    "segments": labels_present,
                    "sex": patient.sex,
                    "stenoses": len(patient.stenoses),
                    **{k: v for k, v in rc.info.items() if k != "iso_pixel_mm"},
                },
            }
        )
    return results


# ---------------------------------------------------------------------------------------------
# Public API


def _validate(cases, seed, size, frames, pseudo_dice, workers) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(cases) or cases < MIN_CASES:
        raise InputError(
            f"cases must be an integer ≥ {MIN_CASES} (one patient per train/val/test split), got {cases!r}", key="cases"
        )
    if not is_int(seed) or seed < 0:
        raise InputError(f"seed must be an integer ≥ 0, got {seed!r}", key="seed")
    if not is_int(size) or not (SIZE_RANGE[0] <= size <= SIZE_RANGE[1]) or size % SIZE_MULTIPLE:
        raise InputError(
            f"size {size!r} is not supported: use a multiple of {SIZE_MULTIPLE} from {SIZE_RANGE[0]} to {SIZE_RANGE[1]} px",
            key="size",
        )
    if not is_int(frames) or not (FRAMES_RANGE[0] <= frames <= FRAMES_RANGE[1]):
        raise InputError(f"frames must be an integer from {FRAMES_RANGE[0]} to {FRAMES_RANGE[1]}, got {frames!r}", key="frames")
    if not isinstance(pseudo_dice, (int, float)) or not (0.5 <= float(pseudo_dice) <= 1.0):
        raise InputError(f"pseudo-label Dice target must be in [0.5, 1.0], got {pseudo_dice!r}", key="pseudo_dice")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise InputError(f"workers must be an integer ≥ 1, got {workers!r}", key="workers")


def generate(
    out_dir: str | Path,
    cases: int,
    seed: int,
    *,
    size: int = 512,
    frames: int = 16,
    preview: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    pseudo_dice: float = 0.83,
    progress: bool = False,
    **knobs,
) -> Path:
    """Write a synthetic study to ``out_dir`` (see the module docstring) and return its path.

    ``knobs`` override StudyKnobs / RenderKnobs / PseudoLabelModel fields by name (ranges as
    (low, high) or "low,high"). ``workers``: processes (default: all cores); it never changes
    the output. Bad arguments raise InputError before anything is written.
    """
    _validate(cases, seed, size, frames, pseudo_dice, workers)
    all_knobs = build_knobs(pseudo_dice, knobs)
    out = Path(out_dir)
    refuse_output_over_inputs(out)  # no inputs; never the current folder or one above it
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output already exists (pass --overwrite to replace it): {out}")

    plans = plan_study(cases, seed, all_knobs.study)
    by_patient: dict[int, list[CasePlan]] = {}
    for plan in plans:
        by_patient.setdefault(plan.patient_index, []).append(plan)
    n_workers = min(workers or os.cpu_count() or 1, len(by_patient))

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for sub in ("cines", "masks", "gt_masks", "segments"):
            (tmp / sub).mkdir()
        tasks = [
            _PatientTask(seed, p, tuple(ps), size, frames, all_knobs, str(tmp)) for p, ps in sorted(by_patient.items())
        ]
        bar = _progress_bar(progress, cases)
        results: list[dict] = []
        if n_workers <= 1:
            for task in tasks:
                results += _run_patient(task)
                bar.update(len(task.cases))
        else:
            # spawn: no inherited threads or locks from the caller (pytest, MLflow, …).
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                for task, res in zip(tasks, pool.map(_run_patient, tasks)):
                    results += res
                    bar.update(len(task.cases))
        bar.close()

        rows = [r["row"] for r in results]
        details = [r["detail"] for r in results]
        _write_index(tmp / "index.csv", rows)
        write_json_atomic(tmp / "manifest.json", _manifest(seed, cases, size, frames, preview, all_knobs, plans, rows, details))
        if preview:
            from angioexp.data.synthetic.preview import contact_sheet

            write_bytes_atomic(tmp / "preview.png", contact_sheet(tmp, rows, details))
    return out


def _progress_bar(enabled: bool, total: int):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="case", desc="synth")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


def _write_index(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def _stats(values) -> dict:
    v = np.asarray(values, float)
    return {
        "mean": round(float(v.mean()), 4),
        "std": round(float(v.std()), 4),
        "min": round(float(v.min()), 4),
        "max": round(float(v.max()), 4),
    }


def _manifest(seed, cases, size, frames, preview, knobs: Knobs, plans, rows, details) -> dict:
    patients = {}
    for row in rows:
        patients.setdefault(row["patient_id"], row)
    splits = {
        s: {"cases": sum(r["split"] == s for r in rows), "patients": sum(r["split"] == s for r in patients.values())}
        for s in SPLITS
    }
    dominance = {d: sum(r["dominance"] == d for r in patients.values()) for d in DOMINANCE_PREVALENCE}
    views = {name: sum(r["view"] == name for r in rows) for name in STANDARD_VIEWS}
    dtypes = {t: sum(d["dtype"] == t for d in details) for t in ("uint8", "uint16")}
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        # workers, overwrite and out_dir are not recorded: they never change the output.
        "args": {"cases": cases, "size": size, "frames": frames, "preview": bool(preview), "pseudo_dice": knobs.pseudo.target_dice},
        "knobs": knobs.to_dict(),
        "geometry": {
            "coordinates": "DICOM LPS patient mm; primary LAO+/RAO-, secondary CRA+/CAU-",
            "source_isocentre_mm": 750.0,
            "pixel_spacing_mm": "in the isocentre plane (detector pitch / magnification)",
            "cine_fps": 15.0,
            "frame_index": "peak-opacification frame; labels are exact for it",
        },
        "cine_dtypes": dtypes,
        "cine_value_range": {"uint8": [0, 255], "uint16": [0, 4095]},
        "splits": splits,
        "patients": len(patients),
        "dominance_patients": dominance,
        "views": views,
        "pseudo_label_dice": {"target": knobs.pseudo.target_dice, **_stats([d["pseudo_dice"] for d in details])},
        "vessel_fraction": _stats([d["vessel_fraction"] for d in details]),
        "segment_overlap_rule": "a pixel covered by several projected segments gets the one it lies deepest inside",
        "cases": details,
    }


def measure_throughput(cases: int = 16, size: int = 512, frames: int = 16, workers: int = 2, seed: int = 0) -> float:
    """Cases per second of ``generate`` (writing to a temporary folder, process start-up included)."""
    with tempfile.TemporaryDirectory(prefix="angioexp-synth-bench-") as tmp:
        start = time.perf_counter()
        generate(Path(tmp) / "study", cases=cases, seed=seed, size=size, frames=frames, workers=workers)
        return cases / (time.perf_counter() - start)
