"""Data throughput: synthetic cases/s and index.csv → COCO frames/s at 512² on 2 workers.

Goals: convert ≥ 100 frames/s, synth ≥ 2 cases/s at 16 frames (issue 2) and ≥ 8 single annotated
frames/s (issue 13: Stage 2 sets of ≥ 1,500 frames must not dominate the main job). Times are wall time of
the public entry points (``generate``, ``convert``) on a temporary folder, worker start-up,
validation and the dataset digest included.
"""

from __future__ import annotations

import csv
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from angioexp.bench import Figure

TITLE = "Data: synthetic generation and COCO conversion"
SIZE = 512
WORKERS = 2
SYNTH_FRAMES = 16
CONVERT_GOAL = 100.0  # frames/s
SYNTH_GOAL = 2.0  # cases/s
SYNTH_SINGLE_GOAL = 8.0  # frames/s of single-frame cases


def _have_generator() -> bool:
    try:
        from angioexp.data.synthetic import generate  # noqa: F401
    except ImportError:
        return False
    return True


def _simple_study(root: Path, cases: int, size: int, seed: int = 0) -> Path:
    """A plain study (noisy background + random-walk vessels) when the generator is missing."""
    rng = np.random.default_rng(seed)
    for folder in ("cines", "masks", "segments"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(cases):
        labels = np.zeros((size, size), dtype=np.uint8)
        for label in (5, 6, 7, 11):
            y, x, angle = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0, 6.3)
            for _ in range(size // 8):
                angle += rng.normal(0, 0.2)
                y, x = y + 4 * np.sin(angle), x + 4 * np.cos(angle)
                r0, r1 = int(max(0, y - 4)), int(min(size, y + 5))
                c0, c1 = int(max(0, x - 4)), int(min(size, x + 5))
                window = (yy[r0:r1, c0:c1] - y) ** 2 + (xx[r0:r1, c0:c1] - x) ** 2 <= 9
                labels[r0:r1, c0:c1][window] = label
        frame = 170 - 60 * (labels > 0) + rng.normal(0, 8, (size, size))
        np.save(root / "cines" / f"c{i:04d}.npy", np.clip(frame, 0, 255).astype(np.uint8)[None])
        np.save(root / "masks" / f"c{i:04d}.npy", (labels > 0).astype(np.uint8))
        np.save(root / "segments" / f"c{i:04d}.npy", labels)
        rows.append({"case_id": f"c{i:04d}", "patient_id": f"p{i}", "split": ("train", "val", "test")[i % 3],
                     "cine_path": f"cines/c{i:04d}.npy", "frame_index": 0, "mask_path": f"masks/c{i:04d}.npy",
                     "segment_mask_path": f"segments/c{i:04d}.npy"})
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "index.csv"


def _replicate(index_csv: Path, copies: int, out: Path) -> Path:
    """An index.csv listing every row ``copies`` times (new case ids, same files and splits):
    enough frames for a stable rate without generating hundreds of cines."""
    with open(index_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    root = index_csv.parent
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for k in range(copies):
            for row in rows:
                copy = dict(row, case_id=f"{row['case_id']}_r{k}")
                for column in ("cine_path", "mask_path", "segment_mask_path", "gt_mask_path"):
                    if copy.get(column):
                        copy[column] = os.path.relpath(root / copy[column], out.parent)
                writer.writerow(copy)
    return out


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of (this process, its finished children — the converter's forked workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def run(quick: bool) -> list[Figure]:
    from angioexp.data.convert import convert

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="angioexp-bench-data-") as tmp:
        tmp = Path(tmp)
        synth_cases = 6 if quick else 24
        convert_frames = 48 if quick else 240
        if _have_generator():
            from angioexp.data.synthetic import generate

            load = os.getloadavg()[0]
            start = time.perf_counter()
            generate(tmp / "synth", synth_cases, 0, size=SIZE, frames=SYNTH_FRAMES, workers=WORKERS)
            rate = synth_cases / (time.perf_counter() - start)
            figures.append(Figure(f"synth {SIZE}², {SYNTH_FRAMES} frames, {WORKERS} workers", rate, "cases/s",
                                  f">= {SYNTH_GOAL:g} cases/s", rate >= SYNTH_GOAL,
                                  f"generate() of {synth_cases} cases, wall time; load avg {load:.1f}"))
            single_cases = 12 if quick else 48
            load = os.getloadavg()[0]
            (main0, workers0), start = _cpu_seconds(), time.perf_counter()
            generate(tmp / "synth1", single_cases, 0, size=SIZE, frames=1, workers=WORKERS)
            rate = single_cases / (time.perf_counter() - start)
            main_cpu, workers_cpu = (b - a for a, b in zip((main0, workers0), _cpu_seconds()))
            figures.append(Figure(f"synth {SIZE}², 1 frame, {WORKERS} workers", rate, "frames/s",
                                  f">= {SYNTH_SINGLE_GOAL:g} frames/s", rate >= SYNTH_SINGLE_GOAL,
                                  f"generate() of {single_cases} single-frame cases, wall time incl. worker "
                                  f"start-up; load avg {load:.1f}"))
            if workers_cpu > 0:
                free = single_cases / (main_cpu + workers_cpu / WORKERS)
                figures.append(Figure(
                    f"synth {SIZE}², 1 frame: CPU-bound rate on {WORKERS} free cores (estimate)", free, "frames/s",
                    f">= {SYNTH_SINGLE_GOAL:g} frames/s", free >= SYNTH_SINGLE_GOAL,
                    f"frames / (main CPU {main_cpu:.2f} s + workers CPU {workers_cpu:.2f} s / {WORKERS}), "
                    "worker imports included; for machines shared with other jobs",
                ))
            source, study = tmp / "synth" / "index.csv", "synthetic frames"
        else:
            figures.append(Figure("synth", "n/a", note="angioexp.data.synthetic not available"))
            source, study = _simple_study(tmp / "plain", 24, SIZE), "plain frames"

        with open(source) as handle:
            rows = sum(1 for _ in handle) - 1
        index_csv = _replicate(source, max(1, round(convert_frames / rows)), tmp / "index.csv")
        with open(index_csv) as handle:
            frames = sum(1 for _ in handle) - 1
        for stage in (1, 2):
            load = os.getloadavg()[0]
            (main0, workers0), start = _cpu_seconds(), time.perf_counter()
            convert(index_csv, tmp / f"coco{stage}", stage=stage, workers=WORKERS)
            wall = time.perf_counter() - start
            main_cpu, workers_cpu = (b - a for a, b in zip((main0, workers0), _cpu_seconds()))
            rate = frames / wall
            figures.append(Figure(
                f"convert stage {stage}, {SIZE}², {WORKERS} workers", rate, "frames/s",
                f">= {CONVERT_GOAL:g} frames/s", rate >= CONVERT_GOAL,
                f"convert() of {frames} {study}, wall time incl. validation + digest; "
                f"load avg {load:.1f} on {os.cpu_count()} cores",
            ))
            if workers_cpu > 0:
                # What the CPU work allows when the cores are free: workers in parallel + the
                # main process's share counted as serial (pessimistic: it overlaps in reality).
                free = frames / (main_cpu + workers_cpu / WORKERS)
                figures.append(Figure(
                    f"convert stage {stage}: CPU-bound rate on {WORKERS} free cores (estimate)", free, "frames/s",
                    f">= {CONVERT_GOAL:g} frames/s", free >= CONVERT_GOAL,
                    f"frames / (main CPU {main_cpu:.2f} s + workers CPU {workers_cpu:.2f} s / {WORKERS}); "
                    "for machines shared with other jobs",
                ))
    return figures
